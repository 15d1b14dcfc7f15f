from click.testing import CliRunner

from atu.cli import main


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("world", "demo"):
        assert command in result.output
    result = CliRunner().invoke(main, ["world", "--help"])
    assert "build" in result.output


def test_world_build_bad_config_is_one_line_error(tmp_path):
    cfg = tmp_path / "w.yaml"
    cfg.write_text("lm:\n  layers: 3\n")
    result = CliRunner().invoke(main, ["world", "build", "--config", str(cfg)])
    assert result.exit_code == 1
    assert f"error: {cfg}: world.lm: unknown key 'layers'" in result.output
    assert "Traceback" not in result.output
