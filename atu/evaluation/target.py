"""`atu eval`: evaluate any model (a Hugging Face id or path) or an export on a probes file and a concept set.

With an export, the forgotten concepts default to those in its concept index, and the export's own predictor
gives the leakage AUROC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from atu import formats
from atu.concept_reader import ConceptReader
from atu.errors import ConfigError
from atu.evaluation.evaluate import evaluate_model
from atu.loading import load_lm
from atu.run_data import file_eval_inputs

logger = logging.getLogger(__name__)


@dataclass
class EvalData:
    """Paths of the evaluation data; ``probes`` and ``concepts`` are required, the rest enable more metrics."""

    probes: str
    concepts: str
    corpus: str | None = None  # forget and retain texts (leakage and membership-inference AUROC)
    heldout: str | None = None  # held-out texts: perplexity on those of retained concepts
    unseen: str | None = None  # texts about concepts never trained on: membership inference


def world_eval_data(tiny: bool = False) -> EvalData:
    from atu.world.build import build_world
    from atu.world.config import WorldConfig

    built = build_world(WorldConfig.tiny() if tiny else WorldConfig())
    return EvalData(
        *(
            str(built.path(n))
            for n in ("probes.jsonl", "concepts.yaml", "corpus.jsonl", "heldout.jsonl", "unseen.jsonl")
        )
    )


def evaluate_target(
    target: str | Path, data: EvalData, forget: list[str] | None = None, *, device: str = "cpu", progress: bool = True
) -> dict:
    """Evaluate ``target`` (model id/path or export directory); returns the JSON of `atu eval`."""
    guard = None
    model_ref = str(target)
    if (Path(target) / "manifest.json").is_file():
        from atu.export import load_export

        exp = load_export(target)
        model_ref = str(exp.model_dir)
        forget = forget or list(exp.index.labels)
        guard = exp
    concepts = formats.read_concepts(data.concepts)
    probes = formats.read_probes(data.probes)
    if not forget:
        raise ConfigError("name the forgotten concepts (--forget NAME), or evaluate an export, which lists them")
    unknown = [n for n in forget if n not in concepts.names()]
    if unknown:
        raise ConfigError(f"--forget names {unknown[0]!r}, which is not in {data.concepts}")
    model, tokenizer = load_lm(model_ref, device=device)
    guard_arg = None
    if guard is not None:  # the export's reader, on the concepts evaluated
        labels = guard.index.labels
        rows = [labels.index(n) for n in forget if n in labels]
        guard_arg = ConceptReader.from_export(guard, rows) if rows else None
    inputs = file_eval_inputs(data, probes, concepts, forget)
    result = evaluate_model(model, tokenizer, inputs, guard=guard_arg, progress=progress)
    result["model"] = model_ref
    result["forgotten"] = list(forget)
    return result
