"""The Python API: `atu.unlearn(...)` runs the whole job (the same one as `atu run`) from Python objects and returns
an ``UnlearnResult``; `atu.load_export` and `atu.Scorer` read and score with an export.

A model given as an object (a transformers model and its tokenizer) is saved into the run directory first: the
job reloads the original model from a path (for the "before" evaluation and the cosines), and the saved copy makes
a run resumable like any other.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from atu import formats
from atu.errors import ConfigError
from atu.run_config import RunConfig

logger = logging.getLogger(__name__)

INPUTS_DIR = "inputs"  # in the run directory: the model and data files written from Python objects


@dataclass
class Data:
    """Your own data for `atu.unlearn`, as paths or objects (None: the config's ``data`` section, or the embedded
    world's file)."""

    corpus: Any = None  # texts as strings, (text, concept) pairs or CorpusRecords; or a JSONL path
    concepts: Any = None  # a ConceptSet or names; or a YAML path
    probes: Any = None  # Probes; or a JSONL path
    validation: Any = None  # held-out retain texts (the stopping signal); or a JSONL path
    retain: Any = None  # texts the retain terms train on; or a JSONL path


@dataclass
class UnlearnResult:
    """What `atu.unlearn` returns. The heavy parts (model, predictor, concept index) are read from the export when
    first used."""

    config: RunConfig
    summary: dict[str, Any]  # what eval.json holds: before/after scores, stages, stop reason, criteria inputs
    export_dir: Path  # RUN/export, already verified
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False)

    @cached_property
    def export(self):
        """The export (``atu.export.Export``): guard config, predictor, concept index, manifest."""
        from atu.export import load_export

        return load_export(self.export_dir)

    @property
    def model(self):
        """The unlearned transformers model (loaded from the export's model directory on first use)."""
        if "model" not in self._loaded:
            from atu.loading import load_lm

            self._loaded["model"], self._loaded["tokenizer"] = load_lm(self.export.model_dir)
        return self._loaded["model"]

    @property
    def tokenizer(self):
        self.model  # noqa: B018  (loads both)
        return self._loaded["tokenizer"]

    @property
    def predictor(self):
        """The embedding predictor aligned to the unlearned model (what the guard scores with)."""
        return self.export.predictor

    @property
    def concept_index(self):
        """The FAISS index of the forgotten concepts' vectors, with their labels and thresholds."""
        return self.export.index

    @property
    def evaluation(self) -> dict[str, Any]:
        """Before and after scores: ``{"before": ..., "after": ..., "similarity": ...}`` (None without probes)."""
        return {k: self.summary.get(k) for k in ("before", "after", "similarity")}

    def criteria(self) -> list[dict]:
        """Every pass criterion of the config's ``eval`` section: ``{"name", "value", "target", "met"}``."""
        from atu.evaluation.metrics import similarity_criteria, unlearning_criteria

        s, bounds = self.summary, self.config.eval
        rows = unlearning_criteria(s["before"], s["after"], **bounds.bounds()) if s.get("before") else []
        return rows + similarity_criteria(
            s.get("similarity", {}), s["final_thresholds"], s["forget"], shift=bounds.similarity_shift
        )

    def scorer(self, **kwargs):
        """A ``Scorer`` over the export (``serve.scoring.Scorer.from_export`` arguments)."""
        from serve.scoring import Scorer

        return Scorer.from_export(self.export_dir, **kwargs)

    def save_export(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Copy the export to ``path`` and verify the copy (every file's sha256, every dimension)."""
        from atu.export import load_export

        path = Path(path)
        if path.exists():
            if not overwrite:
                raise ConfigError(f"{path}: already exists; pass overwrite=True or choose another directory")
            shutil.rmtree(path)
        shutil.copytree(self.export_dir, path)
        load_export(path)
        return path


def _records(items, kind: str):
    """Texts as CorpusRecords from strings, (text, concept) pairs, mappings or CorpusRecords."""
    out = []
    for item in items:
        if isinstance(item, formats.CorpusRecord):
            out.append(item)
        elif isinstance(item, str):
            out.append(formats.CorpusRecord(item))
        elif isinstance(item, dict):
            out.append(formats.CorpusRecord(item["text"], item.get("concept")))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(formats.CorpusRecord(*item))
        else:
            raise ConfigError(f"{kind}: expected text, (text, concept), {{'text', 'concept'}}, got {item!r}")
    return out


def _data_file(value, name: str, inputs: Path, write) -> str:
    """A path as given, or the in-memory value written to ``inputs/name`` by ``write``."""
    if isinstance(value, (str, Path)):
        return str(value)
    inputs.mkdir(parents=True, exist_ok=True)
    write(inputs / name, value)
    return str(inputs / name)


def _write_concepts(path: Path, value) -> None:
    if not isinstance(value, formats.ConceptSet):
        value = formats.ConceptSet([c if isinstance(c, formats.Concept) else formats.Concept(c) for c in value])
    formats.write_concepts(path, value)


def unlearn(
    model: Any,
    *,
    forget: Sequence[str] | None = None,
    tokenizer: Any = None,
    data: Data | None = None,
    config: RunConfig | dict[str, Any] | None = None,
    out: str | Path | None = None,
    progress: bool = False,
) -> UnlearnResult | None:
    """Make ``model`` forget the concepts ``forget``: align, unlearn, export and evaluate, as `atu run` does.

    ``model``: a Hugging Face id or path, "world" / "world:tiny", or a transformers causal LM object (then pass its
    ``tokenizer``). ``data``: your data files or objects (``Data``). ``config``: a ``RunConfig`` or a mapping of
    run-config keys (``align``, ``unlearn``, ``eval``...) for everything else; the arguments here take precedence.
    Returns an ``UnlearnResult``; the run directory (``out``, default the config's) holds eval.json, metrics.jsonl
    and the export, as after `atu run`. Under torchrun, the processes other than the first return None."""
    from atu.run import run

    raw = config.to_dict() if isinstance(config, RunConfig) else dict(config or {})
    if out is not None:
        raw["out"] = str(out)
    run_dir = Path(raw.get("out") or "atu_run")
    raw["out"] = str(run_dir)
    inputs = run_dir / INPUTS_DIR
    if isinstance(model, (str, Path)):
        raw["model"] = str(model)
    else:
        if tokenizer is None:
            raise ConfigError("a model given as an object needs its tokenizer: unlearn(model, tokenizer=...)")
        (inputs / "model").mkdir(parents=True, exist_ok=True)
        model.save_pretrained(inputs / "model")
        tokenizer.save_pretrained(inputs / "model")
        raw["model"] = str(inputs / "model")
    given, data = data or Data(), dict(raw.get("data") or {})
    jsonl = formats.write_jsonl
    for key, value, name, write in (
        ("corpus", given.corpus, "corpus.jsonl", lambda p, v: jsonl(p, _records(v, "corpus"))),
        ("concepts", given.concepts, "concepts.yaml", _write_concepts),
        ("probes", given.probes, "probes.jsonl", jsonl),
        ("validation", given.validation, "validation.jsonl", lambda p, v: jsonl(p, _records(v, "validation"))),
        ("retain", given.retain, "retain.jsonl", lambda p, v: jsonl(p, _records(v, "retain"))),
    ):
        if value is not None:
            data[key] = _data_file(value, name, inputs, write)
    if forget is not None:
        data["forget"] = list(forget)
    raw["data"] = data
    cfg = RunConfig.from_dict(raw, "atu.unlearn")
    summary = run(cfg, progress=progress, export=True)
    if summary is None:  # not the first process of a data-parallel run: that one holds the result
        return None
    return UnlearnResult(cfg, summary, Path(summary["export"]))


def load_export(path: str | Path):
    """Read and verify an export (``atu.export.load_export``): model directory, guard config, predictor, index."""
    from atu.export import load_export as _load

    return _load(path)
