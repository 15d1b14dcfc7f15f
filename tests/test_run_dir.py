"""The schedule's run-directory files: metrics.jsonl and the checkpoint (atu/run_dir.py)."""

from __future__ import annotations

import pytest
import torch

from atu.errors import AtuError
from atu.predictor import EmbeddingPredictor, PredictorConfig
from atu.run_dir import Checkpoint, MetricsLog

pytestmark = pytest.mark.usefixtures("one_thread")


def _predictor(seed: int) -> EmbeddingPredictor:
    torch.manual_seed(seed)
    return EmbeddingPredictor(PredictorConfig(8, 4, 8, 1, 2, max_len=16))


def test_metrics_log_appends_one_sorted_record_a_line(tmp_path):
    with MetricsLog(tmp_path / "run") as log:
        log({"b": 1, "a": 2})
    with MetricsLog(tmp_path / "run") as log:
        log({"event": "again"})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert lines == ['{"a": 2, "b": 1}', '{"event": "again"}']


def test_metrics_log_without_a_run_directory_writes_nothing(tmp_path):
    with MetricsLog(None) as log:
        log({"a": 1})
    assert not list(tmp_path.iterdir())


def test_checkpoint_round_trip(tmp_path):
    params = {"w": torch.arange(6.0).reshape(2, 3)}
    predictor, driving = _predictor(0), _predictor(1)
    stages = [{"stage": 0, "tau": 0.5}]
    Checkpoint(tmp_path, "key").save(params, predictor, driving, stages)
    back = Checkpoint(tmp_path, "key").load()
    assert torch.equal(back.params["w"], params["w"]) and back.stages == stages
    for saved, loaded in ((predictor, back.predictor), (driving, back.driving)):
        for a, b in zip(saved.state_dict().values(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_checkpoint_without_driving_predictor_and_missing_checkpoint(tmp_path):
    assert Checkpoint(tmp_path, "key").load() is None
    Checkpoint(tmp_path, "key").save({"w": torch.zeros(1)}, _predictor(0), None, [])
    assert Checkpoint(tmp_path, "key").load().driving is None


def test_checkpoint_of_another_config_is_refused_unless_replaced(tmp_path):
    Checkpoint(tmp_path, "old").save({"w": torch.zeros(1)}, _predictor(0), None, [{"stage": 0}])
    with pytest.raises(AtuError, match="checkpoint of a different run config"):
        Checkpoint(tmp_path, "new").load()
    assert Checkpoint(tmp_path, "new").load(replace_stale=True) is None


def test_corrupt_checkpoint_names_the_directory(tmp_path):
    Checkpoint(tmp_path, "key").save({"w": torch.zeros(1)}, _predictor(0), None, [])
    (tmp_path / "checkpoint" / "state.json").write_text("{not json")
    with pytest.raises(AtuError, match="corrupt checkpoint"):
        Checkpoint(tmp_path, "key").load()
