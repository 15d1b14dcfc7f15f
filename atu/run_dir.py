"""What the schedule keeps in its run directory: the per-step metrics (``metrics.jsonl``) and the checkpoint of the
last kept stage (``checkpoint/``), from which a killed run resumes."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from atu.atomic import replaced_dir
from atu.errors import AtuError
from atu.predictor import EmbeddingPredictor, load_predictor, save_predictor

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON record a line to ``run_dir/metrics.jsonl``; with no run directory it drops them."""

    def __init__(self, run_dir: Path | None):
        self._file = None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(run_dir / METRICS_FILE, "a", encoding="utf-8")

    def __call__(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            self._file.flush()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class Resumed:
    """What a checkpoint holds: the state after its last kept stage."""

    params: dict[str, torch.Tensor]  # the trainable parameters, by name
    predictor: EmbeddingPredictor  # re-aligned after the last kept stage
    driving: EmbeddingPredictor | None  # the frozen predictor that drove the last kept stage
    stages: list[dict]  # one record per kept stage


class Checkpoint:
    """``run_dir/checkpoint``, written atomically after every kept stage. ``key`` names the config it belongs to: a
    checkpoint of another config is refused, or with ``replace_stale`` ignored (and replaced by the next save)."""

    def __init__(self, run_dir: Path, key: str):
        self.path = run_dir / CHECKPOINT_DIR
        self.key = key

    def save(self, params: dict[str, torch.Tensor], predictor, driving, stages: list[dict]) -> None:
        with replaced_dir(self.path) as tmp:
            tensors = {n: t.detach().cpu().contiguous() for n, t in params.items()}
            save_file(tensors, str(tmp / "trainable.safetensors"))
            save_predictor(predictor, tmp / "predictor")
            if driving is not None:
                save_predictor(driving, tmp / "driving_predictor")
            state = {"key": self.key, "stages": stages}
            (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")

    def load(self, replace_stale: bool = False) -> Resumed | None:
        ckpt = self.path
        if not (ckpt / "state.json").is_file():
            return None
        try:
            state = json.loads((ckpt / "state.json").read_text())
            if state.get("key") != self.key:
                if replace_stale:
                    logger.warning("%s: checkpoint of a different run config; starting over", ckpt)
                    return None
                raise AtuError(f"{ckpt}: checkpoint of a different run config; use another --run-dir or delete it")
            params = load_file(str(ckpt / "trainable.safetensors"))
            predictor = load_predictor(ckpt / "predictor")
            driving = load_predictor(ckpt / "driving_predictor") if (ckpt / "driving_predictor").is_dir() else None
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise AtuError(f"{ckpt}: corrupt checkpoint ({e}); delete it to start over") from None
        return Resumed(params, predictor, driving, state["stages"])
