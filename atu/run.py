"""Run a whole job from a RunConfig: load, evaluate before, align + unlearn (schedule), export, evaluate after."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from atu import envs, formats
from atu.atomic import replaced_dir
from atu.distributed import SINGLE, Dist, from_environment
from atu.errors import AtuError, ConfigError
from atu.evaluate import evaluate_model, fpr_thresholds, mean_similarity, text_concept_scores, text_leakage
from atu.export import GuardConfig, write_export
from atu.index import ConceptIndex
from atu.loading import load_encoder, load_lm
from atu.metrics import auroc
from atu.pipeline import RunConfig
from atu.predictor import load_predictor, save_predictor
from atu.schedule import ScheduleInputs, ScheduleResult, initial_alignment, run_schedule
from atu.unlearn import concept_window_texts, target_vectors

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

    def evaluation_texts(self) -> dict[str, list[str]]:
        """The text keyword arguments of `evaluate_model`: the forgotten people's own texts (those filed under them,
        not the texts that name them), a sample of retain texts (at most half of them: the retain terms train on
        the rest), and the unseen texts."""
        forget = set(self.forget)
        return {
            "forget_texts": [r.text for r in self.corpus if r.concept in forget],
            "retain_texts": self.retain_texts[: min(EVAL_RETAIN_TEXTS, len(self.retain_texts) // 2)],
            "unseen_texts": self.unseen,
        }


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


def _resolve_world(cfg: RunConfig, progress: bool) -> tuple[str, dict[str, str]]:
    if cfg.model not in ("world", "world:tiny"):
        return cfg.model, {}
    from atu.world.build import build_world
    from atu.world.config import WorldConfig

    built = build_world(WorldConfig.tiny() if cfg.model == "world:tiny" else WorldConfig(), progress=progress)
    files = {
        "corpus": "corpus.jsonl",
        "concepts": "concepts.yaml",
        "validation": "heldout.jsonl",
        "probes": "probes.jsonl",
        "unseen": "unseen.jsonl",
    }
    return str(built.model_dir), {k: str(built.path(v)) for k, v in files.items()}


def load_run_data(cfg: RunConfig, defaults: dict[str, str]) -> RunData:
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


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but torch sees no GPU; use device: cpu or auto")
    return name


def run(
    cfg: RunConfig,
    *,
    progress: bool = True,
    export: bool = True,
    replace_stale: bool = False,
    on_stage: Callable[..., None] | None = None,
) -> dict | None:
    """The whole job. Writes ``cfg.out``: metrics.jsonl, aligned/, checkpoint/, export/, eval.json. Returns the
    summary.

    ``on_stage(record, model=, predictor=, concept_vectors=, hook_layer=)`` is called after every kept stage (after
    its re-alignment), with the model in eval mode: the model at that point is the result of the schedule cut after
    that stage. It must not change the model or the predictor.

    A checkpoint in ``cfg.out`` from another config is an error, unless ``replace_stale`` (the demo's own directory,
    after an upgrade changed its settings): then the run starts over and the next checkpoint replaces it.

    Launched by torchrun or ``accelerate launch``, the processes share the unlearning steps (atu/distributed.py); the
    first one evaluates, exports and returns the summary, the others return None."""
    return _distributed(
        cfg, _run, progress=progress, export=export, evaluate=True, keep=False, replace_stale=replace_stale,
        on_stage=on_stage,
    )  # fmt: skip


def align(cfg: RunConfig, *, progress: bool = True) -> dict | None:
    """`atu align`: align the predictor to the model (LM frozen) and keep it in ``cfg.out/aligned``, where
    `atu unlearn` and `atu run` of a config with the same model, texts and ``align`` section reuse it.
    Returns the alignment metrics (None on processes other than the first)."""

    def job(cfg, dist, *, progress):
        j = _setup(cfg, dist, progress)
        _, _, metrics = initial_alignment(
            j.model, j.tokenizer, j.encoder, j.inputs, cfg.align, run_dir=Path(cfg.out), progress=progress, dist=dist,
            need_data=False,
        )  # fmt: skip
        return metrics if dist.main else None

    return _distributed(cfg, job, progress=progress)


def unlearn(cfg: RunConfig, *, progress: bool = True) -> dict | None:
    """`atu unlearn`: align (or reuse ``cfg.out/aligned``) and run the unlearning schedule, without evaluating; keep
    the unlearned model and its predictors in ``cfg.out/unlearned`` for `atu export`. Returns the summary."""
    return _distributed(
        cfg, _run, progress=progress, export=False, evaluate=False, keep=True, replace_stale=False, on_stage=None
    )


def _distributed(cfg: RunConfig, job: Callable[..., dict | None], *, progress: bool, **kwargs) -> dict | None:
    dist = from_environment(cfg.device)
    try:
        return job(cfg, dist, progress=progress and dist.main, **kwargs)
    finally:
        dist.close()


@dataclass
class _Job:
    model_ref: str
    data: RunData
    device: str
    model: Any
    tokenizer: Any
    encoder: Any
    inputs: ScheduleInputs


def _setup(cfg: RunConfig, dist: Dist, progress: bool, model_path: Path | None = None) -> _Job:
    """Load the data, the model (``model_path`` instead of the config's, if given) and the encoder, and split the
    texts the way the schedule uses them."""
    with dist.main_first():  # the first process builds the world (if not cached) before the others read it
        model_ref, defaults = _resolve_world(cfg, progress)
    data = load_run_data(cfg, defaults)
    device = dist.device if dist.active else _device(cfg.device)
    model, tokenizer = load_lm(model_path or model_ref, device=device)
    encoder = load_encoder(cfg.encoder, device=device)
    concepts = data.concepts.subset(data.forget)
    if cfg.guard_target == "description" and any(not c.description for c in concepts.concepts):
        raise ConfigError("guard_target is 'description' but a forgotten concept has no description in data.concepts")
    row = {n: i for i, n in enumerate(data.forget)}
    validation = data.retain_known if cfg.stop_signal == "retain_corpus" else data.validation
    # The retain terms never train on the texts the stopping signal reads, nor on the retain texts the evaluation
    # reads (perplexity and the driving predictor's cosines): both stay held-out checks.
    held_out = set(validation) | set(data.evaluation_texts()["retain_texts"])
    inputs = ScheduleInputs(
        concepts=concepts,
        forget_texts=data.forget_texts,
        forget_concepts=data.forget_rows,
        own_concepts=[[row[c]] if c in row else [] for c in data.forget_owners],
        align_texts=[r.text for r in data.corpus],
        validation_texts=validation,
        validation_name="retained-people corpus" if cfg.stop_signal == "retain_corpus" else "held-out retain",
        retain_texts=[t for t in data.retain_texts if t not in held_out],
        heldout_forget=data.heldout_forget,
    )
    return _Job(model_ref, data, device, model, tokenizer, encoder, inputs)


def _run(
    cfg: RunConfig, dist: Dist, *, progress, export, evaluate, keep, replace_stale, on_stage
) -> dict | None:  # fmt: skip
    out = Path(cfg.out)
    t0 = time.time()
    j = _setup(cfg, dist, progress)
    data, model, tokenizer = j.data, j.model, j.tokenizer
    texts = data.evaluation_texts()
    before = (
        evaluate_model(
            model,
            tokenizer,
            data.probes,
            data.concepts,
            data.forget,
            data.evaluation,
            **texts,
            stand_ins=data.unseen_names,
            max_new_tokens=cfg.eval.max_new_tokens,
        )
        if data.probes and dist.main and evaluate
        else None
    )

    result = run_schedule(
        model, tokenizer, j.encoder, j.inputs, cfg.align, cfg.unlearn, run_dir=out, progress=progress,
        replace_stale=replace_stale, on_stage=on_stage, dist=dist,
    )  # fmt: skip
    if not dist.main:
        return None
    final = result.model.merge_and_unload() if hasattr(result.model, "merge_and_unload") else result.model
    final.eval()
    summary = {
        "forget": data.forget,
        "hook_layer": result.hook_layer,
        "stop_reason": result.stop_reason,
        "processes": dist.world,  # data-parallel processes that shared the alignment and unlearning steps
        "stages": [{k: s[k] for k in ("stage", "tau", "rise", "val_ppl", "stage_seconds")} for s in result.stages],
        "align": result.align_metrics,
        "final_thresholds": result.final_thresholds,
        "forgetting": result.forgetting,
    }
    if keep:
        save_unlearned(out / UNLEARNED_DIR, final, tokenizer, result, summary, cfg.to_dict())
        summary["unlearned"] = str(out / UNLEARNED_DIR)
    if evaluate:
        after_guard = (result.predictor, result.hook_layer, result.concept_vectors)
        options = {"guard": after_guard, "max_new_tokens": cfg.eval.max_new_tokens}
        after = (
            evaluate_model(
                final, tokenizer, data.probes, data.concepts, data.forget, data.evaluation, **texts, **options
            )
            if data.probes
            else None
        )
        similarity = _similarity_report(
            j.model_ref, j.device, final, tokenizer, result, texts["forget_texts"], texts["retain_texts"]
        )
        if before is not None:
            before["leakage_auroc"] = similarity.pop("before_leakage_auroc")
        summary.update(similarity=similarity, before=before, after=after)
    summary["seconds"] = round(time.time() - t0, 1)
    if export or evaluate:
        guard, index = guard_index(
            cfg, j, final, result.predictor, result.hook_layer, result.concept_vectors, result.final_thresholds
        )
        summary["guard_target"] = guard.concept_target
        summary["guard_thresholds"] = [round(float(t), 4) for t in index.thresholds]
    if export:
        brief = {"before": _brief(before), "after": _brief(summary.get("after")), "stop_reason": result.stop_reason}
        write_export(
            out / "export",
            model=final,
            tokenizer=tokenizer,
            predictor=result.predictor,
            guard=guard,
            index=index,
            training_config=cfg.to_dict(),
            eval_summary=brief,
            overwrite=True,
        )
        summary["export"] = str(out / "export")
    if evaluate:
        (out / "eval.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def guard_index(
    cfg: RunConfig, j: _Job, final, predictor, layer: int, concept_vectors, final_thresholds: list[float]
) -> tuple[GuardConfig, ConceptIndex]:
    """The guard config and the FAISS index of the forgotten concepts for an export of ``final``.

    The index's vectors embed ``cfg.guard_target`` (default: the unlearning target, whose vectors are
    ``concept_vectors``); with ``cfg.guard_fpr`` the thresholds are set to that false-positive rate on the held-out
    retain texts, else they are the schedule's final thresholds."""
    concepts = j.inputs.concepts
    guard_target = cfg.guard_target or cfg.unlearn.target_kinds[0]
    vectors = concept_vectors.cpu()  # the unlearning's first target kind
    if guard_target != cfg.unlearn.target_kinds[0]:
        windows = concept_window_texts(
            len(concepts.concepts), j.inputs.forget_texts, j.inputs.centroid_rows(), j.tokenizer, j.encoder,
            cfg.align.window, cfg.align.max_length,
        ) if guard_target == "centroid" else None  # fmt: skip
        vectors = target_vectors(concepts, j.encoder, guard_target, windows).cpu()
    thresholds = np.asarray(final_thresholds, dtype=np.float32)
    if cfg.guard_fpr is not None and j.data.validation:
        held = text_concept_scores(final, predictor, j.tokenizer, j.data.validation, vectors, layer)
        thresholds = fpr_thresholds(held.numpy(), cfg.guard_fpr)
        logger.info(
            "guard thresholds at %.0f%% false positives on held-out texts: %s", 100 * cfg.guard_fpr, thresholds
        )
    guard = GuardConfig(
        hook_layer=layer,
        window=cfg.align.window,
        encoder=cfg.encoder,
        hidden_size=final.config.hidden_size,
        embedding_dim=vectors.shape[1],
        num_layers=final.config.num_hidden_layers,
        concept_target=guard_target,
        threshold_fpr=cfg.guard_fpr if cfg.guard_fpr is not None and j.data.validation else None,
    )
    return guard, ConceptIndex.build(vectors.numpy(), j.data.forget, thresholds)


UNLEARNED_DIR = "unlearned"  # in a run directory: what `atu unlearn` leaves for `atu export`
# The config sections that decide the unlearned model; the guard's (guard_target, guard_fpr) may change at export.
_UNLEARN_KEYS = ("model", "encoder", "data", "align", "unlearn", "stop_signal")


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


def export_unlearned(cfg: RunConfig, out_dir: Path | None = None, *, overwrite: bool = False, progress: bool = True):
    """`atu export`: write the export of what `atu unlearn` left in ``cfg.out/unlearned`` (to ``cfg.out/export``
    unless ``out_dir``), with the guard that ``cfg`` asks for. Returns the export's path."""
    if envs.world_size() > 1:
        raise ConfigError("atu export runs in one process; start it without torchrun or accelerate launch")
    src = Path(cfg.out) / UNLEARNED_DIR
    if not (src / "unlearned.json").is_file():
        raise ConfigError(f"{src}: no unlearned model; run `atu unlearn` with this config first")
    try:
        state = json.loads((src / "unlearned.json").read_text())
        summary, saved = state["summary"], state["config"]
        vectors = load_file(str(src / "concept_vectors.safetensors"))["concept_vectors"]
        predictor = load_predictor(src / "predictor")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise AtuError(f"{src}: unreadable ({e}); run `atu unlearn` again") from None
    now = cfg.to_dict()
    changed = [k for k in _UNLEARN_KEYS if saved.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"{src} was unlearned with another config (it differs in: {', '.join(changed)})")
    j = _setup(cfg, SINGLE, progress, model_path=src / "model")
    guard, index = guard_index(
        cfg, j, j.model, predictor.to(j.device), summary["hook_layer"], vectors, summary["final_thresholds"]
    )
    dest = Path(out_dir) if out_dir is not None else Path(cfg.out) / "export"
    return write_export(
        dest,
        model=j.model,
        tokenizer=j.tokenizer,
        predictor=predictor,
        guard=guard,
        index=index,
        training_config=now,
        eval_summary={"stop_reason": summary["stop_reason"]},
        overwrite=overwrite or out_dir is None,
    )


def _brief(ev: dict | None) -> dict | None:
    if ev is None:
        return None
    return {k: v for k, v in ev.items() if k != "answers"}


def _similarity_report(model_ref, device, final, tokenizer, result, forget_texts, retain_texts) -> dict:
    """Mean cosine to each concept on forget and retain texts: the original model with its aligned predictor, and
    the unlearned model with the predictor that drove the last kept stage (before the final re-alignment)."""
    original, _ = load_lm(model_ref, device=device)
    layer, vectors = result.hook_layer, result.concept_vectors
    report = {
        "before_leakage_auroc": auroc(
            text_leakage(original, result.initial_predictor, tokenizer, forget_texts, vectors, layer),
            text_leakage(original, result.initial_predictor, tokenizer, retain_texts, vectors, layer),
        ),
        "before": {
            "forget": mean_similarity(original, result.initial_predictor, tokenizer, forget_texts, vectors, layer),
            "retain": mean_similarity(original, result.initial_predictor, tokenizer, retain_texts, vectors, layer),
        },
        "after_final_predictor": {
            "forget": mean_similarity(final, result.predictor, tokenizer, forget_texts, vectors, layer),
            "retain": mean_similarity(final, result.predictor, tokenizer, retain_texts, vectors, layer),
        },
    }
    if result.driving_predictor is not None:
        report["after_driving_predictor"] = {
            "forget": mean_similarity(final, result.driving_predictor, tokenizer, forget_texts, vectors, layer),
            "retain": mean_similarity(final, result.driving_predictor, tokenizer, retain_texts, vectors, layer),
        }
    return report
