"""What an attack compares against: the export's original model and evaluation data, read from its manifest.

`atu run` stores its whole RunConfig in the export's manifest (``training_config``): the model it started from (a
Hugging Face id or path, or the embedded world) and the data files. An attack evaluates the attacked export and that
original model on the same probes as `atu eval`, with the export's own predictor for the leakage AUROC.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from atu import formats
from atu.concept_reader import ConceptReader
from atu.errors import ConfigError
from atu.evaluation.evaluate import evaluate_model
from atu.evaluation.target import EvalData, world_eval_data
from atu.export import Export, load_export
from atu.run_config import WORLD_MODELS
from atu.run_data import file_eval_inputs


@dataclass
class ExportSource:
    """An export with everything an attack reads besides its model."""

    export: Export
    original: str  # the model before unlearning: a Hugging Face id or path
    data: EvalData
    forget: list[str]  # the concepts the export forgot (its index labels)

    @property
    def hook_layer(self) -> int:
        return self.export.guard.hook_layer


def _from_training_config(raw: dict) -> tuple[str, EvalData | None]:
    model = raw.get("model")
    if not isinstance(model, str):
        raise ConfigError("the export's manifest has no training_config.model; pass --original")
    if model in WORLD_MODELS:
        from atu.world.build import build_world
        from atu.world.config import WorldConfig

        built = build_world(WorldConfig.tiny() if model == "world:tiny" else WorldConfig(), progress=False)
        return str(built.model_dir), world_eval_data(tiny=model == "world:tiny")
    d = raw.get("data") or {}
    if not d.get("probes") or not d.get("concepts"):
        return model, None
    return model, EvalData(d["probes"], d["concepts"], d.get("corpus"), d.get("validation"), d.get("unseen"))


def export_source(
    export_dir: str | Path, *, data: EvalData | None = None, original: str | None = None
) -> ExportSource:
    """Load the export (every hash verified) and find its original model and data: ``data`` and ``original`` when
    given, else what its manifest's training config names (the embedded world's files for a world run)."""
    exp = load_export(export_dir)
    raw = exp.manifest.get("training_config")
    if (data is None or original is None) and isinstance(raw, dict):
        found_model, found_data = _from_training_config(raw)
        original = original or found_model
        data = data or found_data
    if original is None:
        raise ConfigError(
            f"{export_dir}: its manifest does not say which model it was unlearned from; pass --original"
        )
    if data is None:
        raise ConfigError(
            f"{export_dir}: its manifest names no probes and concepts; pass --world or --probes/--concepts"
        )
    return ExportSource(exp, original, data, list(exp.index.labels))


def evaluate_loaded(model, tokenizer, src: ExportSource, *, progress: bool = False) -> dict:
    """`atu eval`'s evaluation (``atu.evaluation.target.evaluate_target`` on the export) of a model already in
    memory: the same probes, perplexity texts, forget/retain/unseen texts, and the export's predictor for the leakage
    AUROC."""
    d = src.data
    concepts, probes = formats.read_concepts(d.concepts), formats.read_probes(d.probes)
    unknown = [n for n in src.forget if n not in concepts.names()]
    if unknown:
        raise ConfigError(f"the export forgot {unknown[0]!r}, which is not in {d.concepts}")
    inputs = file_eval_inputs(d, probes, concepts, src.forget)
    guard = ConceptReader(src.export.predictor, src.hook_layer, torch.from_numpy(src.export.index.vectors()))
    return evaluate_model(model, tokenizer, inputs, guard=guard, progress=progress)
