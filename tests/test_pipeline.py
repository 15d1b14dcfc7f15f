from pathlib import Path

import pytest

from atu.errors import ConfigError
from atu.run_config import RunConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_paper_config_loads_without_the_model():
    cfg = RunConfig.load(CONFIGS / "paper_phi3.yaml")
    assert cfg.model == "microsoft/Phi-3-mini-4k-instruct"
    assert cfg.encoder == "sentence-transformers/all-mpnet-base-v2"
    assert cfg.align.hook_layer == 29 and cfg.align.window == 8
    assert cfg.unlearn.taus[0] == 0.9 and cfg.unlearn.taus[-1] == 0.2
    assert cfg.unlearn.steps_per_stage == 1000 and cfg.unlearn.lr == pytest.approx(3e-4)


def test_world_config_loads():
    cfg = RunConfig.load(CONFIGS / "world.yaml")
    assert cfg.model == "world" and cfg.data.forget == ["Ceda Kestridge"]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": "x", "data": {"corpus": "c", "concepts": "k"}, "colour": 1}, "unknown key 'colour'"),
        ({"model": "x"}, "data.corpus and data.concepts are required"),
        ({"data": {}}, "missing key 'model'"),
        ({"model": "world", "data": {"forgets": []}}, "unknown key 'data.forgets'"),
        ({"model": "world", "unlearn": {"taus": [0.5, 0.9]}}, "must not rise"),
        ({"model": "world", "device": "tpu"}, "device must be auto, cpu or cuda"),
        ({"model": "world", "guard_target": "contrast"}, "guard_target must be one of"),
        ({"model": "world", "stop_signal": "probes"}, "stop_signal must be 'heldout' or 'retain_corpus'"),
    ],
)
def test_bad_configs(raw, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(raw)


@pytest.mark.parametrize("name, n", [("world.yaml", 1), ("world_three.yaml", 3)])
def test_world_configs_are_what_the_demo_runs(name, n):
    """configs/world*.yaml and `atu demo --forget N` (atu.run_config.world_settings) hold the same settings."""
    from atu.run_config import world_settings

    cfg = RunConfig.load(CONFIGS / name)
    demo = RunConfig.from_dict({"model": "world", "data": {"forget": cfg.data.forget}, **world_settings(n)})
    assert len(cfg.data.forget) == n and cfg.data.mentions
    demo.out = cfg.out
    assert cfg.to_dict() == demo.to_dict()
