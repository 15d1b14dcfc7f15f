"""The config of a job (`RunConfig`): what `atu run CONFIG.yaml`, `atu align`, `atu unlearn` and `atu export` read.
The job itself (the steps it takes) is atu/run.py.

The keys are the fields of ``RunConfig`` and of the stage configs it holds (``DataConfig``, ``EvalConfig``,
``atu.align.AlignConfig``, ``atu.unlearn.UnlearnConfig``, ``atu.harden.HardenConfig``); `atu config show CONFIG`
prints a config with every default and a line of help per key, and docs/config.md lists them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atu.align import AlignConfig
from atu.configs import FPR_SCOPES, dataclass_from_dict, is_open_fraction
from atu.errors import ConfigError
from atu.harden import HardenConfig
from atu.loading import DEFAULT_ENCODER
from atu.unlearn import UnlearnConfig

WORLD_MODELS = ("world", "world:tiny")


@dataclass
class DataConfig:
    """Where the texts come from. With model "world" or "world:tiny", every path defaults to the built world's."""

    corpus: str | None = None  # corpus.jsonl ({"text", "concept"}): the texts filed under a forgotten concept go
    concepts: str | None = None  # concepts.yaml: the concept set (names, aliases, descriptions)
    forget: list[str] | None = None  # the concepts to forget, by name (null: every concept of data.concepts)
    validation: str | None = None  # held-out texts (JSONL); those of retained concepts are the stopping signal
    probes: str | None = None  # probes.jsonl: questions scored before and after (optional)
    unseen: str | None = None  # texts about concepts the model never saw, for membership inference (optional)
    # Plain retain texts without concept labels (JSONL {"text"} or a .txt file, one text per line): general text the
    # model must keep. A third each goes to the stopping signal, the retain perplexity of the evaluation and the
    # retain terms' pool, beside whatever the labelled files give.
    retain: str | None = None
    # Texts filed under other concepts that name a forgotten one (by name or alias) are forget texts too, for the
    # concepts they name: "Y is married to X" teaches X. False: only the texts filed under X.
    mentions: bool = True


@dataclass
class EvalConfig:
    """How `atu run` evaluates, and the criteria it reports (`atu run --strict` exits non-zero when one is missed)."""

    max_new_tokens: int = 24  # tokens generated per probe answer; set it above your longest reference answer
    forget_ratio: float = 0.25  # criterion: forget recall after / before is at most this, on each probe kind
    retain_ratio: float = 0.90  # criterion: retain recall after / before is at least this, on each probe kind
    perplexity_ratio: float = 1.10  # criterion: held-out retain perplexity after / before is at most this
    fluency_drop: float = 0.05  # criterion: the share of fluent retained answers falls by at most this
    similarity_shift: float = 0.10  # criterion: the driving predictor's mean cosine on retain texts moves at most this

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("forget_ratio", "retain_ratio", "perplexity_ratio", "fluency_drop", "similarity_shift"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name} must be >= 0, got {getattr(self, name)}")

    def bounds(self) -> dict[str, float]:
        """The keyword arguments of `atu.evaluation.metrics.unlearning_criteria`."""
        return {
            "forget_ratio": self.forget_ratio,
            "retain_ratio": self.retain_ratio,
            "perplexity_ratio": self.perplexity_ratio,
            "fluency_drop": self.fluency_drop,
        }


GUARD_TARGETS = (None, "name", "description", "centroid")


@dataclass
class RunConfig:
    """One job: align, unlearn, export, evaluate. Unknown keys are errors; values are coerced to each key's type."""

    model: str  # any Hugging Face causal LM id or path; "world" or "world:tiny" = the embedded world's model
    encoder: str = DEFAULT_ENCODER  # any sentence-transformers id or path (default: the packaged all-MiniLM-L6-v2)
    data: DataConfig = field(default_factory=DataConfig)  # the texts: corpus, concepts, what to forget, probes
    align: AlignConfig = field(default_factory=AlignConfig)  # how the embedding predictor is built and aligned
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)  # the unlearning schedule
    # After unlearning: re-noise the decoder weights and distil the unlearned model back on the retain texts, so that
    # relearning a few facts does not bring the rest back (off unless harden.enabled)
    harden: HardenConfig = field(default_factory=HardenConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # answer length and the pass criteria of the evaluation
    out: str = "atu_run"  # run directory: checkpoints, metrics.jsonl, aligned/, export/, eval.json
    device: str = "auto"  # auto (CUDA when torch sees a GPU) | cpu | cuda
    # The guard's per-concept thresholds in the export: the score that at most this share of held-out retain texts
    # (data.validation) exceeds, measured with the exported predictor on the exported model. None: use the
    # unlearning's final thresholds (tau), which sit wherever the schedule stopped, not where retain texts score.
    guard_fpr: float | None = 0.05
    # What guard_fpr counts: "union", the held-out texts that any forgotten concept flags (the share of clean traffic
    # the guard flags, whatever the number of concepts); "concept", each concept's on its own (the union grows with
    # the number of concepts).
    guard_fpr_scope: str = "union"
    # What the guard's concept vectors in the export embed: "centroid" (the mean embedding of the concept's own
    # forget-text windows: its facts, so an answer that no longer states them scores lower), "name",
    # "description", or None for the unlearning's own target (unlearn.target). The unlearning never sees it.
    guard_target: str | None = "centroid"
    # What the schedule's retain budget (unlearn.retain_budget) is measured on: "heldout" (data.validation: texts in
    # phrasings the model never saw) or "retain_corpus" (the training texts of the same half of the retained
    # concepts: what the model knows about people it must keep). Never the evaluation probes.
    stop_signal: str = "heldout"

    def __post_init__(self) -> None:
        if self.stop_signal not in ("heldout", "retain_corpus"):
            raise ConfigError(f"stop_signal must be 'heldout' or 'retain_corpus', got {self.stop_signal!r}")
        if self.guard_target not in GUARD_TARGETS:
            raise ConfigError(f"guard_target must be one of {GUARD_TARGETS}, got {self.guard_target!r}")
        if self.guard_fpr is not None and not is_open_fraction(self.guard_fpr):
            raise ConfigError(f"guard_fpr must be a number in (0, 1) or null, got {self.guard_fpr!r}")
        if self.guard_fpr_scope not in FPR_SCOPES:
            raise ConfigError(f"guard_fpr_scope must be one of {FPR_SCOPES}, got {self.guard_fpr_scope!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.model not in WORLD_MODELS and (self.data.corpus is None or self.data.concepts is None):
            raise ConfigError("data.corpus and data.concepts are required unless model is 'world' or 'world:tiny'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> RunConfig:
        """Build from a mapping (a parsed YAML file): values coerced to each key's type, errors naming ``where``."""
        return dataclass_from_dict(cls, raw, where)

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
        """Read a YAML run config, apply ``--set`` style ``overrides`` (``unlearn.lr=3e-4``), build and validate it."""
        from atu.config_tools import apply_overrides, read_yaml

        return cls.from_dict(apply_overrides(read_yaml(path), overrides), str(path))


def world_settings(n_forget: int) -> dict[str, Any]:
    """The embedded world's run settings (besides model, data.forget and out), as `configs/world.yaml` (one
    concept) and `configs/world_three.yaml` (three) write them; `atu demo` runs these. The unlearning settings are
    the library's defaults (placed schedule, name+contrast targets, retain term), the same for any number of
    concepts: the schedule scales its steps with the forget texts."""
    if n_forget < 1:
        raise ConfigError(f"forget at least one concept, got {n_forget}")
    return {
        "encoder": DEFAULT_ENCODER,
        "align": {"hook_layer": 3, "window": 8, "epochs": 20, "realign_epochs": 5},
        "unlearn": {},
        "guard_target": "centroid",
        "device": "auto",
    }


def demo_settings(n_forget: int, tiny: bool = False) -> dict[str, Any]:
    """What `atu demo` runs (besides data.forget and out): the world settings, or on the tiny world (a 2-layer model
    trained in seconds) the library's defaults, shortened. `benchmarks/unlearning.py` runs the same."""
    if tiny:
        if n_forget < 1:
            raise ConfigError(f"forget at least one concept, got {n_forget}")
        return {"model": "world:tiny", "align": {"epochs": 5, "realign_epochs": 2}, "unlearn": {"steps_per_stage": 10}}
    return {"model": "world", **world_settings(n_forget)}
