"""The predictor aligned to the model before unlearning, and its cache in a run directory (``aligned/``).

`atu align` writes it; `atu unlearn` and `atu run` of a config with the same model, texts and ``align`` section
reuse it instead of aligning again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from atu import cache
from atu.align import AlignConfig, AlignmentData, alignment_hidden, new_predictor, prepare_alignment, train_predictor
from atu.atomic import replaced_dir
from atu.distributed import SINGLE, Dist
from atu.errors import AtuError
from atu.hidden import decoder_layers
from atu.predictor import EmbeddingPredictor, load_predictor, save_predictor

logger = logging.getLogger(__name__)

ALIGNED_DIR = "aligned"  # in a run directory: the predictor aligned to the model before unlearning (atu align)


@dataclass
class Alignment:
    """A predictor aligned to a model, and what re-alignment trains on."""

    predictor: EmbeddingPredictor  # on the model's device
    metrics: dict  # train_predictor's metrics and timings; "reused": True when read from ``aligned/``
    data: AlignmentData | None  # None when the predictor was reused: `prepare_alignment` gives it on demand


def aligned_key(model, encoder, texts: list[str], cfg: AlignConfig, layer: int) -> str:
    """What an alignment depends on: the model and the encoder (where they were loaded from, and their sizes), the
    alignment config and hook layer, and the texts."""
    return cache.config_key(
        {
            "align": cfg.to_dict(),
            "layer": layer,
            "model": [getattr(model.config, "_name_or_path", ""), model.config.hidden_size],
            "encoder": [getattr(encoder.tokenizer, "name_or_path", ""), encoder.get_embedding_dimension()],
            "texts": texts,
        }
    )


def save_aligned(run_dir: Path, key: str, predictor, metrics: dict) -> None:
    with replaced_dir(run_dir / ALIGNED_DIR) as tmp:
        save_predictor(predictor, tmp / "predictor")
        state = {"key": key, "metrics": metrics}
        (tmp / "aligned.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")


def load_aligned(run_dir: Path, key: str):
    """(predictor, metrics) saved by an earlier alignment of this model on these texts, else None."""
    state_file = run_dir / ALIGNED_DIR / "aligned.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
        if state.get("key") != key:
            logger.warning(
                "%s: aligned for another model, texts or alignment config; aligning again", state_file.parent
            )
            return None
        return load_predictor(run_dir / ALIGNED_DIR / "predictor"), state["metrics"]
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise AtuError(f"{state_file.parent}: corrupt aligned predictor ({e}); delete it to align again") from None


def initial_alignment(
    model, tokenizer, encoder, texts: list[str], cfg: AlignConfig, *, run_dir: Path | None = None,
    progress: bool = True, dist: Dist = SINGLE,
) -> Alignment:  # fmt: skip
    """Align a new predictor to ``model`` (LM frozen) on ``texts``, or reuse the one ``run_dir/aligned`` holds for
    the same model, texts and config; save it there."""
    layer = cfg.resolve_layer(len(decoder_layers(model)))
    device = next(model.parameters()).device
    key = aligned_key(model, encoder, texts, cfg, layer)
    reused = load_aligned(run_dir, key) if run_dir is not None else None
    # Every process reads before the first one can write (it writes after the collective below): one decision.
    if dist.from_main(float(reused is not None)):
        if reused is None:
            raise AtuError(f"{run_dir / ALIGNED_DIR}: not seen by every process; the run directory must be shared")
        predictor, metrics = reused
        logger.info("reusing the aligned predictor in %s", run_dir / ALIGNED_DIR)
        return Alignment(predictor.to(device), {**metrics, "reused": True}, None)
    t0 = time.time()
    data = prepare_alignment(texts, tokenizer, encoder, cfg, progress=progress, dist=dist)
    t_prepare = time.time() - t0
    predictor = new_predictor(cfg, model.config.hidden_size, encoder.get_embedding_dimension()).to(device)
    train_h, val_h = alignment_hidden(model, data, layer, dist)  # this process's share
    metrics = train_predictor(
        predictor, data, train_h, cfg.epochs, cfg, val_hidden=val_h, progress=progress, dist=dist
    )
    dist.broadcast_(predictor.state_dict().values())
    metrics.update(
        prepare_seconds=round(t_prepare, 1),
        align_seconds=round(time.time() - t0 - t_prepare, 1),
        windows=data.n_windows,
    )
    if run_dir is not None and dist.main:
        save_aligned(run_dir, key, predictor, metrics)
    return Alignment(predictor, metrics, data)
