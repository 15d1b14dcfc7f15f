"""The steps of a job, which the entry points of atu/run.py (`atu run`, `atu align`, `atu unlearn`, `atu export`)
compose, in the order `atu run` takes them:

    prepare          the data (atu/run_data.py), the model and the encoder; the texts split the way the schedule
                     reads them
    start            the predictor aligned to the model (or reused from ``aligned/``) and the concepts' targets
    evaluate_before  every "before" figure, on the model before it changes: probes and the aligned predictor's cosines
    unlearn          the schedule (atu/schedule.py); the unlearned model with adapters merged
    harden           (harden.enabled) the unlearned model re-noised and distilled back (atu/harden.py), and the
                     predictor re-aligned to it
    evaluate_after   the same figures on the unlearned model
    build_guard      the guard config and concept index of an export
    export           the export directory
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atu.align import alignment_hidden, train_predictor
from atu.concept_reader import ConceptReader
from atu.distributed import SINGLE, Dist
from atu.errors import ConfigError
from atu.evaluation.evaluate import EvalInputs, calibrated_thresholds, evaluate_model, too_few_to_calibrate
from atu.evaluation.metrics import auroc
from atu.export import GuardConfig, GuardFiles, write_export
from atu.harden import harden as harden_model
from atu.index import ConceptIndex
from atu.loading import load_encoder, load_lm
from atu.progress import HeldOut
from atu.run_config import RunConfig
from atu.run_data import RunData, load_run_data, resolve_world
from atu.schedule import ScheduleInputs, ScheduleOptions, ScheduleResult, ScheduleStart, run_schedule, schedule_start
from atu.unlearn import concept_window_texts, target_vectors

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """What `prepare` loads for a run."""

    model_ref: str  # where the model was loaded from (the built world's model directory for model "world")
    data: RunData
    device: str
    model: Any  # the causal LM
    tokenizer: Any
    encoder: Any  # the sentence encoder whose embeddings the predictor aligns to
    inputs: ScheduleInputs  # the texts the schedule trains on and stops on


def device_for(name: str) -> str:
    """The torch device a config's ``device`` names (``auto``: CUDA when torch sees a GPU)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but torch sees no GPU; use device: cpu or auto")
    return name


def prepare(cfg: RunConfig, dist: Dist = SINGLE, *, progress: bool = True, model_path: Path | None = None) -> Job:
    """Load the data, the model (``model_path`` instead of the config's, if given) and the encoder, and split the
    texts the way the schedule uses them."""
    with dist.main_first():  # the first process builds the world (if not cached) before the others read it
        model_ref, defaults = resolve_world(cfg, progress)
    data = load_run_data(cfg, defaults)
    device = dist.device if dist.active else device_for(cfg.device)
    model, tokenizer = load_lm(model_path or model_ref, device=device)
    encoder = load_encoder(cfg.encoder, device=device)
    return Job(model_ref, data, device, model, tokenizer, encoder, schedule_inputs(cfg, data))


def schedule_inputs(cfg: RunConfig, data: RunData) -> ScheduleInputs:
    """The texts of ``data`` in the roles the schedule gives them."""
    concepts = data.concepts.subset(data.forget)
    if cfg.guard_target == "description" and any(not c.description for c in concepts.concepts):
        raise ConfigError("guard_target is 'description' but a forgotten concept has no description in data.concepts")
    row = {n: i for i, n in enumerate(data.forget)}
    validation = data.retain_known if cfg.stop_signal == "retain_corpus" else data.validation
    # The retain terms never train on the texts the stopping signal reads, nor on the retain texts the evaluation
    # reads (perplexity and the driving predictor's cosines): both stay held-out checks.
    held_out = set(validation) | set(data.eval_inputs().retain_texts)
    return ScheduleInputs(
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


def start(cfg: RunConfig, job: Job, options: ScheduleOptions) -> ScheduleStart:
    """Align the predictor to the model (or reuse ``cfg.out/aligned``) and embed the concepts' targets."""
    return schedule_start(job.model, job.tokenizer, job.encoder, job.inputs, cfg.align, cfg.unlearn, options)


@dataclass
class Before:
    """The figures of the model before unlearning."""

    probes: dict | None  # `evaluate_model` with the aligned predictor's leakage AUROC; None without probes
    similarity: dict  # the aligned predictor's mean cosine to each concept on forget and retain texts


def evaluate_before(cfg: RunConfig, job: Job, start: ScheduleStart) -> Before:
    """Every "before" figure, on the model as `prepare` loaded it (call it before `unlearn` changes the model)."""
    texts = job.data.eval_inputs()
    reader = ConceptReader(start.aligned.predictor, start.layer, start.vectors)
    probes = None
    if texts.probes:
        probes = evaluate_model(job.model, job.tokenizer, texts, max_new_tokens=cfg.eval.max_new_tokens)
        probes["leakage_auroc"] = auroc(
            reader.leakage(job.model, job.tokenizer, texts.forget_texts),
            reader.leakage(job.model, job.tokenizer, texts.retain_texts),
        )
    return Before(probes, _similarity(job.model, job.tokenizer, reader, texts))


def _similarity(model, tokenizer, reader: ConceptReader, texts: EvalInputs) -> dict:
    return {
        "forget": reader.mean_similarity(model, tokenizer, texts.forget_texts),
        "retain": reader.mean_similarity(model, tokenizer, texts.retain_texts),
    }


def unlearn(cfg: RunConfig, job: Job, start: ScheduleStart, options: ScheduleOptions):
    """Run the schedule from ``start``. Returns (its result, the unlearned model with adapters merged, in eval
    mode)."""
    result = run_schedule(
        job.model, job.tokenizer, job.encoder, job.inputs, cfg.align, cfg.unlearn, start=start, options=options
    )
    final = result.model.merge_and_unload() if hasattr(result.model, "merge_and_unload") else result.model
    return result, final.eval()


@dataclass
class Hardened:
    """What `harden` returns: the schedule's result with the predictor re-aligned to the hardened model."""

    result: ScheduleResult
    model: Any  # the hardened model, in eval mode
    unlearned: Any  # the model before hardening: what the driving predictor was trained against
    record: dict  # atu.harden.harden's record, with the re-alignment's metrics


def harden(cfg: RunConfig, job: Job, start: ScheduleStart, result: ScheduleResult, final, *, progress: bool = True):
    """With ``cfg.harden.enabled``: the unlearned ``final`` re-noised and distilled on `hardening_texts` (checked on
    the stopping signal's held-out texts, as the retain budget reads them), and a copy of the exported predictor
    re-aligned to it for ``align.epochs`` epochs (its states moved far more than a stage moves them).
    Else None."""
    if not cfg.harden.enabled:
        return None
    hardened, record = distil_unlearned(cfg, job.data, job.inputs, final, job.tokenizer, progress=progress)
    predictor = copy.deepcopy(result.predictor)
    train_h, val_h = alignment_hidden(hardened, start.data, result.hook_layer)
    record["realign"] = train_predictor(
        predictor, start.data, train_h, cfg.align.epochs, cfg.align, val_hidden=val_h,
        progress=progress and "re-aligning to the hardened model",
    )  # fmt: skip
    return Hardened(replace(result, predictor=predictor), hardened.eval(), final, record)


def distil_unlearned(cfg: RunConfig, data: RunData, inputs: ScheduleInputs, model, tokenizer, *,
                     progress: bool = False) -> tuple[Any, dict]:  # fmt: skip
    """(the hardened copy of the unlearned ``model``, its record): ``cfg.harden`` on `hardening_texts`, checked on
    the stopping signal's held-out texts as the retain budget reads them, with a warning past the budget."""
    held = HeldOut.build(inputs.heldout_forget, inputs.validation_texts, tokenizer, cfg.align.max_length)
    if cfg.unlearn.budget_min_prob > 0:  # the tokens the retain budget reads
        held.keep_predictable(model, cfg.unlearn.budget_min_prob)
    hardened, record = harden_model(model, tokenizer, hardening_texts(data, inputs), cfg.harden, held=held,
                                    progress=progress)  # fmt: skip
    rise = record.get("check_ppl_rise")
    if rise is not None and rise > cfg.unlearn.retain_budget:
        logger.warning(
            "hardening raised the %s perplexity %.1f%% (retain budget %.0f%%): the distillation did not restore what "
            "the noise removed; try more harden.steps, a lower harden.noise, or more retain texts",
            inputs.validation_name, 100 * rise, 100 * cfg.unlearn.retain_budget,
        )  # fmt: skip
    return hardened, record


def hardening_texts(data: RunData, inputs: ScheduleInputs) -> list[str]:
    """What hardening distils on: every retain text but the stopping signal's held-out ones. The noise takes from
    every retained concept, so each one's texts must be in the distillation, the evaluation's retain texts too (the
    retain terms of the schedule leave those out: for them they are held out)."""
    held_out = set(inputs.validation_texts)
    return [t for t in data.retain_texts if t not in held_out]


def evaluate_after(
    cfg: RunConfig, job: Job, result: ScheduleResult, final, unhardened=None
) -> tuple[dict | None, dict]:
    """(probe figures of ``final``, or None without probes; the predictors' mean cosines on it): the exported
    predictor's, and the one that drove the last kept stage (before the final re-alignment), read on the model it
    drove (``unhardened`` when the model was hardened after it)."""
    texts = job.data.eval_inputs()
    reader = ConceptReader(result.predictor, result.hook_layer, result.concept_vectors)
    after = None
    if texts.probes:
        after = evaluate_model(
            final, job.tokenizer, texts.without_floor(), guard=reader, max_new_tokens=cfg.eval.max_new_tokens
        )
    similarity = {"after_final_predictor": _similarity(final, job.tokenizer, reader, texts)}
    if result.driving_predictor is not None:
        driving = ConceptReader(result.driving_predictor, result.hook_layer, result.concept_vectors)
        driven = final if unhardened is None else unhardened
        similarity["after_driving_predictor"] = _similarity(driven, job.tokenizer, driving, texts)
    return after, similarity


def build_guard(
    cfg: RunConfig, job: Job, final, predictor, layer: int, concept_vectors, final_thresholds: list[float]
) -> tuple[GuardConfig, ConceptIndex]:
    """The guard config and the FAISS index of the forgotten concepts for an export of ``final``.

    The index's vectors embed ``cfg.guard_target`` (default: the unlearning target, whose vectors are
    ``concept_vectors``); with ``cfg.guard_fpr`` the thresholds are set to that false-positive rate on the held-out
    retain texts (over all the concepts or each, ``cfg.guard_fpr_scope``), else they are the schedule's final
    thresholds."""
    guard_target = cfg.guard_target or cfg.unlearn.target_kinds[0]
    vectors = concept_vectors.cpu()  # the unlearning's first target kind
    if guard_target != cfg.unlearn.target_kinds[0]:
        vectors = _guard_vectors(cfg, job, guard_target)
    thresholds = np.asarray(final_thresholds, dtype=np.float32)
    calibrated = cfg.guard_fpr is not None and bool(job.data.validation)
    if calibrated:
        held = ConceptReader(predictor, layer, vectors).concept_scores(final, job.tokenizer, job.data.validation)
        thresholds = calibrated_thresholds(held.numpy(), cfg.guard_fpr, cfg.guard_fpr_scope)
        if too_few_to_calibrate(len(job.data.validation), cfg.guard_fpr):
            logger.warning(
                "guard_fpr %g on %d held-out texts: no text may score above a threshold, so each is the concept's "
                "highest held-out score; %d or more texts (data.validation) place them at that rate",
                cfg.guard_fpr, len(job.data.validation), int(np.ceil(1 / cfg.guard_fpr)),
            )  # fmt: skip
        logger.info(
            "guard thresholds at %.0f%% false positives (%s) on held-out texts: %s",
            100 * cfg.guard_fpr, cfg.guard_fpr_scope, thresholds,
        )  # fmt: skip
    guard = GuardConfig(
        hook_layer=layer,
        window=cfg.align.window,
        encoder=cfg.encoder,
        hidden_size=final.config.hidden_size,
        embedding_dim=vectors.shape[1],
        num_layers=final.config.num_hidden_layers,
        concept_target=guard_target,
        threshold_fpr=cfg.guard_fpr if calibrated else None,
        threshold_fpr_scope=cfg.guard_fpr_scope,
    )
    return guard, ConceptIndex.build(vectors.numpy(), job.data.forget, thresholds)


def _guard_vectors(cfg: RunConfig, job: Job, guard_target: str) -> torch.Tensor:
    """(C, D) the concepts' vectors of a guard target other than the unlearning's."""
    concepts, inputs = job.inputs.concepts, job.inputs
    windows = concept_window_texts(
        len(concepts.concepts), inputs.forget_texts, inputs.centroid_rows(), job.tokenizer, job.encoder,
        cfg.align.window, cfg.align.max_length,
    ) if guard_target == "centroid" else None  # fmt: skip
    return target_vectors(concepts, job.encoder, guard_target, windows).cpu()


def export(cfg: RunConfig, job: Job, final, predictor, guard_index: tuple, eval_summary: dict, dest: Path, *,
           overwrite: bool = True) -> Path:  # fmt: skip
    """Write the export of ``final`` with ``predictor`` and the guard of `build_guard` to ``dest``."""
    guard, index = guard_index
    return write_export(
        dest, model=final, tokenizer=job.tokenizer, guard=GuardFiles(predictor, guard, index),
        training_config=cfg.to_dict(), eval_summary=eval_summary, overwrite=overwrite,
    )  # fmt: skip
