"""The job one stage at a time: `atu align`, `atu unlearn`, `atu export` on the tiny world."""

import copy
import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from atu.cli import main
from atu.export import load_export

pytestmark = pytest.mark.slow


def _write(cfg, path):
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def _events(run_dir, name):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("event") == name]


def test_align_unlearn_export_give_the_export_of_atu_run(tiny_run, tmp_path):
    ran_dir, ran_cfg, _ = tiny_run
    cfg = copy.deepcopy(ran_cfg)
    cfg.out = str(tmp_path / "staged")
    config = _write(cfg, tmp_path / "run.yaml")
    cli = CliRunner()

    result = cli.invoke(main, ["export", config])
    assert result.exit_code == 1 and "no unlearned model; run `atu unlearn`" in result.output
    assert "Traceback" not in result.output

    result = cli.invoke(main, ["align", config])
    assert result.exit_code == 0, result.output
    assert "aligned: train cos" in result.output and (tmp_path / "staged" / "aligned" / "aligned.json").is_file()

    result = cli.invoke(main, ["unlearn", config])
    assert result.exit_code == 0, result.output
    assert _events(tmp_path / "staged", "aligned")[0]["reused"] is True  # the alignment was not trained again
    assert not (tmp_path / "staged" / "eval.json").exists() and not (tmp_path / "staged" / "export").exists()

    result = cli.invoke(main, ["export", config])
    assert result.exit_code == 0, result.output
    staged, ran = load_export(tmp_path / "staged" / "export"), load_export(ran_dir / "export")
    # Aligning in its own command changes nothing: the same model, predictor and index as the whole job's.
    for rel in ("model/model.safetensors", "guard/predictor.safetensors"):
        assert staged.manifest["files"][rel] == ran.manifest["files"][rel]
    np.testing.assert_array_equal(staged.index.thresholds, ran.index.thresholds)
    assert staged.index.labels == ran.index.labels

    # The guard may change at export, without unlearning again; the unlearning settings may not.
    cfg.guard_fpr, cfg.guard_fpr_scope = 0.25, "concept"
    result = cli.invoke(main, ["export", _write(cfg, tmp_path / "fpr.yaml"), "--to", str(tmp_path / "fpr")])
    assert result.exit_code == 0, result.output
    other = load_export(tmp_path / "fpr")
    assert other.manifest["files"]["model/model.safetensors"] == ran.manifest["files"]["model/model.safetensors"]
    assert (other.guard.threshold_fpr, other.guard.threshold_fpr_scope) == (0.25, "concept")
    result = cli.invoke(main, ["export", _write(cfg, tmp_path / "fpr.yaml"), "--to", str(tmp_path / "fpr")])
    assert result.exit_code == 1 and "exists" in result.output  # an explicit destination is not replaced by default
    cfg.unlearn.lr = cfg.unlearn.lr * 2
    result = cli.invoke(main, ["export", _write(cfg, tmp_path / "lr.yaml")])
    assert result.exit_code == 1 and "unlearned with another config (it differs in: unlearn)" in result.output


def test_an_alignment_for_another_config_is_not_reused(tiny_world, tmp_path, monkeypatch):
    from conftest import tiny_run_config

    import atu.schedule
    from atu.run import align, unlearn

    cfg = tiny_run_config(tmp_path / "run")
    cfg.data.forget = tiny_world.concepts().names()[:1]
    first = align(cfg, progress=False)
    assert "reused" not in first
    with monkeypatch.context() as m:  # `atu align` reusing a predictor has no use for the alignment windows
        m.setattr(atu.schedule, "prepare_alignment", lambda *a, **k: pytest.fail("embedded the windows again"))
        assert align(cfg, progress=False)["reused"] is True
    cfg.align.epochs += 1
    summary = unlearn(cfg, progress=False)
    assert "reused" not in summary["align"]
    assert (tmp_path / "run" / "unlearned" / "model" / "model.safetensors").is_file()


def test_export_runs_in_one_process_only(monkeypatch, tmp_path):
    from conftest import tiny_run_config

    from atu.errors import ConfigError
    from atu.run import export_unlearned

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="atu export runs in one process"):
        export_unlearned(tiny_run_config(tmp_path))
