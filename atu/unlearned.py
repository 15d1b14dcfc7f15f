"""``unlearned/`` in a run directory: what `atu unlearn` leaves for `atu export` (the unlearned model, its
predictors, the concept vectors, the run summary and the config that produced them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from atu.atomic import replaced_dir
from atu.errors import AtuError, ConfigError
from atu.predictor import EmbeddingPredictor, load_predictor, save_predictor
from atu.schedule import ScheduleResult

UNLEARNED_DIR = "unlearned"  # in a run directory: what `atu unlearn` leaves for `atu export`
# The config sections that decide the unlearned model; the guard's (guard_target, guard_fpr, guard_fpr_scope) may
# change at export.
UNLEARN_KEYS = ("model", "encoder", "data", "align", "unlearn", "stop_signal")


def save_unlearned(directory: Path, model, tokenizer, result: ScheduleResult, summary: dict, config: dict) -> None:
    """Atomically write ``directory``: model/ (transformers, adapters merged), predictor/ (re-aligned to the model:
    the one to export), driving_predictor/, concept_vectors.safetensors and unlearned.json (summary and config)."""
    with replaced_dir(directory) as tmp:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        save_predictor(result.predictor, tmp / "predictor")
        if result.driving_predictor is not None:
            save_predictor(result.driving_predictor, tmp / "driving_predictor")
        vectors = {"concept_vectors": result.concept_vectors.cpu().contiguous()}
        save_file(vectors, str(tmp / "concept_vectors.safetensors"))
        state = {"summary": summary, "config": config}
        (tmp / "unlearned.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")


@dataclass
class Unlearned:
    """What `load_unlearned` reads back."""

    directory: Path
    summary: dict  # the run summary of `atu unlearn`
    concept_vectors: torch.Tensor  # (C, D)
    predictor: EmbeddingPredictor  # re-aligned to the unlearned model

    @property
    def model_dir(self) -> Path:
        return self.directory / "model"


def load_unlearned(run_dir: Path, config: dict) -> Unlearned:
    """Read ``run_dir/unlearned``, checking that it was unlearned with the same sections of ``config`` (a RunConfig
    as a dict) that decide the unlearned model."""
    src = Path(run_dir) / UNLEARNED_DIR
    if not (src / "unlearned.json").is_file():
        raise ConfigError(f"{src}: no unlearned model; run `atu unlearn` with this config first")
    try:
        state = json.loads((src / "unlearned.json").read_text())
        summary, saved = state["summary"], state["config"]
        vectors = load_file(str(src / "concept_vectors.safetensors"))["concept_vectors"]
        predictor = load_predictor(src / "predictor")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise AtuError(f"{src}: unreadable ({e}); run `atu unlearn` again") from None
    changed = [k for k in UNLEARN_KEYS if saved.get(k) != config.get(k)]
    if changed:
        raise ConfigError(f"{src} was unlearned with another config (it differs in: {', '.join(changed)})")
    return Unlearned(src, summary, vectors, predictor)
