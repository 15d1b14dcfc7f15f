"""The texts of a run: read the data files of a RunConfig (or of the embedded world) and split them into what the
schedule trains on, what steers it and what only the evaluation reads."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from atu import formats
from atu.errors import ConfigError
from atu.evaluation.evaluate import EvalInputs
from atu.run_config import RunConfig

logger = logging.getLogger(__name__)


EVAL_RETAIN_TEXTS = 256  # retain texts `atu run` evaluates perplexity and cosines on


@dataclass
class RunData:
    corpus: list[formats.CorpusRecord]
    concepts: formats.ConceptSet  # the full concept set
    forget: list[str]
    validation: list[str]  # held-out texts of half the retained concepts: the stopping signal (stop_signal heldout)
    evaluation: list[str]  # held-out texts of the other half: perplexity in the evaluation
    probes: list[formats.Probe]
    unseen: list[str]  # texts about concepts the model never saw (membership inference)
    retain_known: list[str] = field(default_factory=list)  # training texts of that same half (retain_corpus)
    forget_texts: list[str] = field(default_factory=list)  # what the unlearning trains on (split_corpus)
    forget_rows: list[list[int]] = field(default_factory=list)  # for each, the rows of ``forget`` it is about
    forget_owners: list[str | None] = field(default_factory=list)  # for each, the concept it is filed under
    retain_texts: list[str] = field(default_factory=list)  # corpus texts neither about nor naming a forgotten concept
    unseen_names: list[str] = field(default_factory=list)  # the concepts of the unseen texts (forget_floor)
    # Held-out texts filed under or naming a forgotten concept: never trained on, where the schedule sees forgetting
    heldout_forget: list[str] = field(default_factory=list)

    def eval_inputs(self) -> EvalInputs:
        """What `evaluate_model` scores: the probes, the held-out evaluation texts, the forgotten people's own texts
        (those filed under them, not the texts that name them), a sample of retain texts (at most half of them: the
        retain terms train on the rest), the unseen texts and their people's names (the forget floor)."""
        forget = set(self.forget)
        return EvalInputs(
            probes=self.probes,
            concepts=self.concepts,
            forget=self.forget,
            perplexity_texts=self.evaluation,
            forget_texts=[r.text for r in self.corpus if r.concept in forget],
            retain_texts=self.retain_texts[: min(EVAL_RETAIN_TEXTS, len(self.retain_texts) // 2)],
            unseen_texts=self.unseen,
            stand_ins=self.unseen_names,
        )


def file_eval_inputs(files, probes: list[formats.Probe], concepts: formats.ConceptSet, forget: list) -> EvalInputs:
    """`EvalInputs` from data files (``files.corpus``, ``.heldout``, ``.unseen``: paths or None), as `atu eval` reads
    them: held-out texts of retained concepts for perplexity, at most ``EVAL_RETAIN_TEXTS`` retain texts."""
    forget_set = set(forget)
    corpus = formats.read_corpus(files.corpus) if files.corpus else []
    heldout = formats.read_corpus(files.heldout) if files.heldout else []
    unseen = formats.read_corpus(files.unseen) if files.unseen else []
    return EvalInputs(
        probes=probes,
        concepts=concepts,
        forget=list(forget),
        perplexity_texts=[r.text for r in heldout if r.concept not in forget_set],
        forget_texts=[r.text for r in corpus if r.concept in forget_set],
        retain_texts=[r.text for r in corpus if r.concept not in forget_set][:EVAL_RETAIN_TEXTS],
        unseen_texts=[r.text for r in unseen],
    )


def split_corpus(
    corpus: list[formats.CorpusRecord], forgotten: formats.ConceptSet, mentions: bool
) -> tuple[list[formats.CorpusRecord], list[list[int]], list[str]]:
    """(forget records, the rows of ``forgotten`` each one is about, retain texts).

    A text is about the concept it is filed under and, with ``mentions``, also about every forgotten concept it
    names by name or alias: the spouse's "X is married to <forgotten>" teaches the forgotten name as much as the
    forgotten person's own bio does. The hinge only pushes positions whose predicted future is close to the
    concept, so the rest of such a text is left alone. Texts about nothing forgotten are retain texts.
    """
    row = {n: i for i, n in enumerate(forgotten.names())}
    forget, rows, retain = [], [], []
    for r in corpus:
        about = {row[r.concept]} if r.concept in row else set()
        if mentions:
            about.update(forgotten.mentioned_in(r.text))
        if about:
            forget.append(r)
            rows.append(sorted(about))
        else:
            retain.append(r.text)
    return forget, rows, retain


def resolve_world(cfg: RunConfig, progress: bool) -> tuple[str, dict[str, str]]:
    """(model reference, {data key: path}) of ``cfg.model``: for the embedded world (``world``, ``world:tiny``) it is
    built (or taken from the cache) and its files fill the data keys the config leaves empty; any other model has no
    default files."""
    if cfg.model not in ("world", "world:tiny"):
        return cfg.model, {}
    from atu.world.build import WORLD_FILES, build_world
    from atu.world.config import WorldConfig

    built = build_world(WorldConfig.tiny() if cfg.model == "world:tiny" else WorldConfig(), progress=progress)
    return str(built.model_dir), {k: str(built.path(v)) for k, v in WORLD_FILES.items()}


def load_run_data(cfg: RunConfig, defaults: dict[str, str]) -> RunData:
    """Read the files of ``cfg.data`` (else ``defaults``, from `resolve_world`) and split them the way a run uses
    them: forget and retain texts, the stopping signal, the evaluation's texts and probes."""

    def path(key: str) -> str | None:
        return getattr(cfg.data, key) or defaults.get(key)

    corpus = formats.read_corpus(path("corpus"))
    concepts = formats.read_concepts(path("concepts"))
    forget = cfg.data.forget or concepts.names()
    unknown = [n for n in forget if n not in concepts.names()]
    if unknown:
        raise ConfigError(f"data.forget names {unknown[0]!r}, which is not in {path('concepts')}")
    for name in forget:
        texts = [r.text for r in corpus if r.concept == name]
        if not texts:
            raise ConfigError(f"no forget texts: {path('corpus')} has no record with concept {name!r}")
        forms = concepts.get(name).surface_forms()
        if not any(f in t for t in texts for f in forms):
            logger.warning("concept %r never appears by name or alias in its own forget texts", name)
    retained = sorted({r.concept for r in corpus if r.concept and r.concept not in forget})
    # Split the retained concepts in two: one half steers the schedule, the other half is only evaluated.
    val_names = set(retained[::2])
    held = formats.read_corpus(path("validation")) if path("validation") else []
    forgotten = concepts.subset(forget)
    heldout_forget = [r.text for r in held if r.concept in forget or forgotten.mentioned_in(r.text)]
    if cfg.data.mentions:  # a held-out text that names a forgotten concept is partly about it: not a retain text
        held = [r for r in held if not forgotten.mentioned_in(r.text)]
    forget_records, forget_rows, retain_texts = split_corpus(corpus, forgotten, cfg.data.mentions)
    retain_set = set(retain_texts)
    # Retained people's corpus texts that name no forgotten concept (with mentions; else all of them).
    known = [r.text for r in corpus if r.concept in val_names and r.text in retain_set]
    if held:
        validation = [r.text for r in held if r.concept in val_names]
        evaluation = [r.text for r in held if r.concept not in val_names and r.concept not in forget]
    else:
        logger.warning("no held-out texts (data.validation): using retained corpus texts as the stopping signal")
        validation = list(known)
        evaluation = [r.text for r in corpus if r.concept in set(retained) - val_names and r.text in retain_set]
    probes = formats.read_probes(path("probes")) if path("probes") else []
    unseen_path = path("unseen")
    unseen_records = formats.read_corpus(unseen_path) if unseen_path and Path(unseen_path).is_file() else []
    unseen = [r.text for r in unseen_records]
    unseen_names = sorted({r.concept for r in unseen_records if r.concept} - set(concepts.names()))
    # Unlabelled retain texts (those naming a forgotten concept left out): a third each to the stopping signal, the
    # evaluation's perplexity and the retain terms.
    if cfg.data.retain:
        plain = [t for t in formats.read_texts(cfg.data.retain) if not forgotten.mentioned_in(t)]
        validation, known = validation + plain[0::3], known + plain[0::3]
        evaluation, retain_texts = evaluation + plain[1::3], retain_texts + plain[2::3]
    return RunData(
        corpus, concepts, list(forget), validation, evaluation, probes, unseen, known,
        [r.text for r in forget_records], forget_rows, [r.concept for r in forget_records], retain_texts, unseen_names,
        heldout_forget,
    )  # fmt: skip
