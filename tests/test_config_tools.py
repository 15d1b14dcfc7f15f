from pathlib import Path

import pytest
from click.testing import CliRunner

from atu.cli import main
from atu.config_tools import apply_overrides, describe, reference, reference_sections, show
from atu.configs import coerce
from atu.errors import ConfigError
from atu.run_config import RunConfig
from atu.unlearn import UnlearnConfig
from atu.world.config import WorldConfig

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_numbers_people_write_are_coerced(tmp_path):
    # PyYAML reads 3e-4 as the string "3e-4" (YAML 1.1 wants a dot); the config must still get a float.
    cfg = RunConfig.load(
        write(tmp_path, "model: world\nunlearn:\n  lr: 3e-4\n  steps_per_stage: 1e2\n  taus: [0.9, 5e-1]\n")
    )
    assert cfg.unlearn.lr == pytest.approx(3e-4) and isinstance(cfg.unlearn.lr, float)
    assert cfg.unlearn.steps_per_stage == 100 and isinstance(cfg.unlearn.steps_per_stage, int)
    assert cfg.unlearn.taus == [0.9, 0.5]


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: world\nunlearn:\n  lr: fast\n", r"cfg\.yaml: unlearn\.lr: expected a number, got 'fast' \(str\)"),
        ("model: world\nunlearn:\n  steps_per_stage: 2.5\n", r"cfg\.yaml: unlearn\.steps_per_stage: expected an int"),
        ("model: world\ndata:\n  mentions: 3\n", r"cfg\.yaml: data\.mentions: expected true or false, got 3"),
        ("model: world\nunlearn:\n  taus: [0.9, x]\n", r"cfg\.yaml: unlearn\.taus\[1\]: expected a number"),
        ("model: world\nunlearn:\n  lr: -1\n", r"cfg\.yaml: unlearn\.lr, grad_clip, baseline_lr and npo_beta must"),
        ("model: world\nalign:\n  windw: 4\n", r"cfg\.yaml: unknown key 'align\.windw' \(allowed in align: "),
        ("model: world\nunlearn: 3\n", r"cfg\.yaml: unlearn: expected a mapping, got int"),
        ("data: {}\n", r"cfg\.yaml: missing key 'model'"),
        ("- a list\n", r"cfg\.yaml: expected a mapping at the top level"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.load(write(tmp_path, text))


def test_coerce_refuses_bools_as_numbers_and_keeps_optional_nulls():
    with pytest.raises(ConfigError, match="k: expected a number, got True"):
        coerce(float, True, "f", "k")
    assert coerce(int | None, None, "f", "k") is None
    assert coerce(int | None, "3", "f", "k") == 3
    assert coerce(list[str] | None, [1984, "Ada"], "f", "k") == ["1984", "Ada"]
    assert coerce(bool, "off", "f", "k") is False


def test_set_and_yaml_give_identical_resolved_configs(tmp_path):
    base = write(tmp_path, "model: world\nunlearn:\n  steps_per_stage: 10\n", "base.yaml")
    same = write(tmp_path, "model: world\nunlearn:\n  steps_per_stage: 10\n  lr: 3e-4\n  taus: [0.9,0.5]\n")
    by_set = RunConfig.load(base, ["unlearn.lr=3e-4", "unlearn.taus=[0.9,0.5]"])
    assert by_set.to_dict() == RunConfig.load(same).to_dict()
    assert by_set.unlearn.lr == pytest.approx(3e-4) and by_set.unlearn.taus == [0.9, 0.5]
    assert by_set.unlearn.steps_per_stage == 10  # untouched keys of the same section are kept


def test_apply_overrides_makes_sections_and_rejects_bad_items():
    assert apply_overrides({"model": "world", "data": None}, ["data.forget=[A, B]"]) == {
        "model": "world",
        "data": {"forget": ["A", "B"]},
    }
    raw = {"model": "world"}
    apply_overrides(raw, ["out=x"])
    assert raw == {"model": "world"}  # the caller's mapping is left alone
    for bad, message in (("unlearn.lr", "takes key.sub=value"), ("a..b=1", "takes key.sub=value"),
                         ("model.x=1", "model is 'world', not a section")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            apply_overrides(raw, [bad])


def test_every_key_has_help():
    for _, _, cls in reference_sections():
        missing = [d.key for d in describe(cls) if not d.help]
        assert not missing, f"{cls.__name__}: keys without help (comment the field): {missing}"


def test_show_lists_every_key_with_its_value_and_reads_back(tmp_path):
    import yaml

    cfg = RunConfig.load(ROOT / "configs" / "world.yaml", ["unlearn.lr=3e-4"])
    text = show(RunConfig, cfg)
    lines = text.splitlines()
    assert len(lines) == len(list(describe(RunConfig)))
    assert all("# " in line for line in lines)
    assert "  lr: 0.0003" in text
    assert RunConfig.from_dict(yaml.safe_load(text)).to_dict() == cfg.to_dict()  # the printout is a valid config


def test_reference_doc_is_up_to_date():
    doc = ROOT / "docs" / "config.md"
    assert doc.read_text() == reference(reference_sections()), "run `atu config reference --out docs/config.md`"


def test_world_config_coerces_and_set_works():
    cfg = WorldConfig.from_dict(apply_overrides({"train": {"lr": "5e-3"}}, ["n_people=6", "lm.hidden_size=128"]))
    assert cfg.train.lr == pytest.approx(5e-3) and cfg.n_people == 6 and cfg.lm.hidden_size == 128
    assert UnlearnConfig.from_dict({"lr": "1e-2"}).lr == pytest.approx(1e-2)


def test_cli_config_show_version_and_verbose_everywhere(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["config", "show", str(ROOT / "configs" / "world.yaml"), "--set", "unlearn.lr=3e-4"])
    assert result.exit_code == 0, result.output
    assert "lr: 0.0003" in result.output and "retain_budget: 0.1" in result.output
    bad = runner.invoke(main, ["config", "show", str(write(tmp_path, "model: world\n")), "--set", "unlearn.lr=x"])
    assert bad.exit_code == 1 and "error: " in bad.output and "unlearn.lr: expected a number" in bad.output
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == "atu 0.1.0"

    def commands(cmd, path=()):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from commands(sub, (*path, name))

    for path, cmd in commands(main):
        assert any("--verbose" in p.opts and "-v" in p.opts for p in cmd.params), f"atu {' '.join(path)} has no -v"
    assert runner.invoke(main, ["config", "show", "-v", str(ROOT / "configs" / "world.yaml")]).exit_code == 0


def test_world_build_set_and_bad_key_names_the_file(tmp_path):
    path = write(tmp_path, "lm:\n  layers: 3\n", "w.yaml")
    result = CliRunner().invoke(main, ["world", "build", "--config", str(path)])
    assert result.exit_code == 1 and f"error: {path}: world.lm: unknown key 'layers'" in result.output
    result = CliRunner().invoke(main, ["world", "build", "--tiny", "--set", "n_people=one"])
    assert result.exit_code == 1 and "n_people: expected an integer, got 'one'" in result.output
