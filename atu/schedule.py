"""The Align-then-Unlearn schedule: align, then alternate (unlearn at tau, check retain, re-align) with a falling
tau, and stop on a validation signal, never on evaluation probes.

Stopping rule: after each unlearning stage, perplexity on held-out retain texts is compared with its value before
unlearning. If it rose by more than ``retain_budget``, that stage is undone and the schedule stops with the model of
the previous stage. Every stage ends with a re-alignment, so the predictor that is kept (and exported) is aligned
to the model that is kept. The predictor that drove the last kept stage is kept too, for evaluation.

With a run directory, every kept stage is checkpointed (atomically) and a killed run resumes after the last
checkpointed stage; per-step metrics go to ``metrics.jsonl`` (atu/run_dir.py).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from atu import cache
from atu.align import AlignConfig, AlignmentData, alignment_hidden, prepare_alignment, train_predictor
from atu.aligned import Alignment, initial_alignment
from atu.baselines import BaselineConfig, baseline_stage, reference_logprobs
from atu.distributed import SINGLE, Dist
from atu.errors import ConfigError
from atu.formats import ConceptSet
from atu.hidden import attach_lora, decoder_layers, enable_checkpointing, freeze_above
from atu.plan import RETAIN_SAMPLE, Plan, floor_progress, make_plan, placement_cosines
from atu.predictor import EmbeddingPredictor
from atu.progress import HeldOut, forgetting_verdict
from atu.quant_aware import quantized_view
from atu.run_dir import Checkpoint, MetricsLog
from atu.unlearn import (
    RetainSet,
    StageInputs,
    UnlearnConfig,
    build_retain_set,
    concept_window_texts,
    expand_rows,
    forget_batches,
    target_rows,
    unlearn_stage,
)

logger = logging.getLogger(__name__)


@dataclass
class ScheduleInputs:
    concepts: ConceptSet  # the concepts to forget
    forget_texts: list[str]  # texts about them
    forget_concepts: list[list[int]]  # for each forget text, the rows of ``concepts`` it is about
    align_texts: list[str]  # texts the predictor is aligned on (forget and retain)
    validation_texts: list[str]  # retain texts whose perplexity is the stopping signal
    retain_texts: list[str] = field(default_factory=list)  # retain texts for logging and the optional retain loss
    validation_name: str = "held-out retain"  # what validation_texts are, for the stop reason
    # Texts about the forgotten concepts that the unlearning never trains on: where forgetting is measured. Empty:
    # the run cannot tell whether it forgot, and says so.
    heldout_forget: list[str] = field(default_factory=list)
    # For each forget text, the concepts it is filed under (its own texts): what a centroid target averages, so a
    # text that only names the concept does not pull its centroid. None: forget_concepts.
    own_concepts: list[list[int]] | None = None

    def centroid_rows(self) -> list[list[int]]:
        return self.own_concepts if self.own_concepts is not None else self.forget_concepts


@dataclass
class ScheduleResult:
    model: torch.nn.Module  # the unlearned model (LoRA still attached when method is lora)
    predictor: EmbeddingPredictor  # re-aligned to ``model``: the one to export
    driving_predictor: EmbeddingPredictor | None  # the frozen predictor of the last kept stage
    initial_predictor: EmbeddingPredictor  # aligned to the model before unlearning
    concept_vectors: torch.Tensor  # (C, D)
    hook_layer: int
    stages: list[dict]  # one record per kept stage
    stop_reason: str
    align_metrics: dict
    forgetting: dict  # whether held-out texts about the concepts were forgotten, and how the schedule was placed
    final_thresholds: list[float]  # per concept, the first target kind's threshold in the last kept stage


@dataclass
class ScheduleOptions:
    """How one schedule run is hosted: where it keeps its files, who reports, what it calls after each stage."""

    run_dir: Path | None = None  # metrics.jsonl, checkpoint/ and aligned/; None: nothing is written
    progress: bool = True  # progress bars (on the first process only)
    # A checkpoint in run_dir from another config: an error (False), or ignored and replaced by the next (True).
    replace_stale: bool = False
    # Called after every kept stage, after its re-alignment, with the model in eval mode (see `atu.run.run`).
    on_stage: Callable[..., None] | None = None
    dist: Dist = SINGLE  # the data-parallel processes sharing the steps


def checkpoint_key(inputs: ScheduleInputs, align: AlignConfig, unlearn: UnlearnConfig) -> str:
    """What a checkpoint belongs to: the configs, the concepts and the texts the unlearning trains on."""
    return cache.config_key(
        {
            "align": align.to_dict(),
            "unlearn": unlearn.to_dict(),
            "concepts": inputs.concepts.names(),
            "forget": inputs.forget_texts,
            "retain": inputs.retain_texts,
        }
    )


def make_trainable(model, layer: int, cfg: UnlearnConfig):
    """Set up what the unlearning may change; returns (model, {name: param})."""
    if cfg.method == "lora":
        model = attach_lora(model, layer, cfg.lora_rank, cfg.lora_alpha)
    else:
        freeze_above(model, layer, train_embeddings=cfg.train_embeddings)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model, {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rate(cfg: UnlearnConfig) -> float:
    """The learning rate a stage runs at: ATU's, or the baseline's."""
    return cfg.lr if cfg.algorithm == "atu" else cfg.baseline_lr


def _check_inputs(inputs: ScheduleInputs, cfg: UnlearnConfig) -> None:
    if not inputs.forget_texts:
        raise ConfigError("no forget texts: the corpus has no text about the concepts to forget")
    if not inputs.validation_texts:
        raise ConfigError("no held-out retain texts: the schedule needs them to decide where to stop")
    if cfg.uses_retain and not inputs.retain_texts:
        raise ConfigError(
            "unlearn.retain_weight or unlearn.retain_similarity_weight is set but there are no retain texts to train "
            "it on (corpus texts about no forgotten concept, besides those the stopping signal and evaluation read)"
        )


@dataclass
class ScheduleStart:
    """Where the schedule starts from, taken before the model changes: the aligned predictor and the concepts'
    targets (the "before" figures of a run read them too)."""

    aligned: Alignment  # the predictor aligned to the model before unlearning
    data: AlignmentData  # what re-alignment trains on: the alignment texts' windows
    rows: torch.Tensor  # (K * C, D) the targets of every kind for every concept, kind-major
    layer: int  # the hook layer
    n_concepts: int  # C

    @property
    def vectors(self) -> torch.Tensor:
        """(C, D) the first target kind's rows: what reports, evaluation and the guard read."""
        return self.rows[: self.n_concepts]


def schedule_start(
    model, tokenizer, encoder, inputs: ScheduleInputs, align_cfg: AlignConfig, unlearn_cfg: UnlearnConfig,
    options: ScheduleOptions | None = None,
) -> ScheduleStart:  # fmt: skip
    """Align the predictor to ``model`` (or reuse the one in ``options.run_dir/aligned``) and embed the targets."""
    _check_inputs(inputs, unlearn_cfg)
    opts = options or ScheduleOptions()
    progress = opts.progress and opts.dist.main
    aligned = initial_alignment(model, tokenizer, encoder, inputs.align_texts, align_cfg, run_dir=opts.run_dir,
                                progress=progress, dist=opts.dist)  # fmt: skip
    data = aligned.data
    if data is None:  # a reused predictor: re-alignment still needs the texts' windows
        data = prepare_alignment(inputs.align_texts, tokenizer, encoder, align_cfg, progress=progress, dist=opts.dist)
    kinds, n_concepts = unlearn_cfg.target_kinds, len(inputs.concepts.concepts)
    window_texts = None
    if {"centroid", "contrast"} & set(kinds):
        window_texts = concept_window_texts(
            n_concepts, inputs.forget_texts, inputs.centroid_rows(), tokenizer, encoder, align_cfg.window,
            align_cfg.max_length,
        )  # fmt: skip
    rows = target_rows(inputs.concepts, encoder, kinds, window_texts, background=data.targets.mean(0))
    layer = align_cfg.resolve_layer(len(decoder_layers(model)))
    return ScheduleStart(aligned, data, rows, layer, n_concepts)


@dataclass
class _Stages:
    """What every stage reads, built once before the first one."""

    model: torch.nn.Module  # with what the unlearning may change set up (LoRA attached, or layers frozen)
    params: dict[str, torch.nn.Parameter]  # those trainable parameters, by name
    layer: int  # the hook layer
    data: AlignmentData  # what re-alignment trains on
    rows: torch.Tensor  # (R, D) the target rows, kind-major
    vectors: torch.Tensor  # (C, D) the first kind's rows: what reports and evaluation read
    batches: list  # forget batches, their concept rows expanded to every target kind
    retain: RetainSet | None  # the retain terms' texts and references
    held: HeldOut  # the stopping signal's texts, and the held-out forget texts
    plan: Plan
    steps: int  # optimizer steps a stage
    ref: list[torch.Tensor] | None  # npo's reference: each forget batch's log-likelihoods before unlearning
    retain_before: float  # held-out retain perplexity before unlearning (the first process's)
    forget_before: float | None  # held-out forget perplexity before unlearning (first process only)

    def final_thresholds(self, stages: list[dict]) -> list[float]:
        """Per concept, the first target kind's threshold in the last kept stage (the first stage's, if none)."""
        n = self.vectors.shape[0]
        return stages[-1]["thresholds"][:n] if stages else self.plan.taus[0][:n].tolist()


@dataclass
class _StageDone:
    """How a stage ended: kept with its ``record``, or undone (``stop_reason`` says why)."""

    cfg: UnlearnConfig  # the config its last try ran at
    driving: torch.nn.Module  # the frozen predictor that drove it
    record: dict | None = None
    stop_reason: str | None = None

    @property
    def undone(self) -> bool:
        return self.record is None


class _Schedule:
    """The fixed context of one schedule run and its steps: set up, unlearn one stage within the retain budget,
    re-align, and record."""

    def __init__(self, tokenizer, encoder, inputs: ScheduleInputs, align_cfg: AlignConfig, unlearn_cfg: UnlearnConfig,
                 opts: ScheduleOptions, log: MetricsLog):  # fmt: skip
        self.tokenizer, self.encoder, self.inputs = tokenizer, encoder, inputs
        self.align_cfg, self.unlearn_cfg = align_cfg, unlearn_cfg
        self.dist, self.log = opts.dist, log
        self.progress = opts.progress and opts.dist.main

    def view(self, model):
        """The model as the unlearning and its signals see it: through the quantizer when unlearn.quant_aware_bits."""
        return quantized_view(model, self.unlearn_cfg.quant_aware_bits, self.unlearn_cfg.quant_aware_group_size)

    def setup(self, model, start: ScheduleStart) -> _Stages:
        inputs, acfg, ucfg, dist = self.inputs, self.align_cfg, self.unlearn_cfg, self.dist
        predictor, rows, layer, n_concepts = start.aligned.predictor, start.rows, start.layer, start.n_concepts
        # Before anything is trained: the retain terms' references are the original model's states and the aligned
        # predictor's cosines on them.
        retain = build_retain_set(
            inputs.retain_texts, self.tokenizer, acfg.max_length, ucfg, model, layer, predictor, rows
        )
        batches = expand_rows(
            forget_batches(inputs.forget_texts, inputs.forget_concepts, n_concepts, self.tokenizer, acfg.max_length,
                           ucfg.batch_size, ucfg.seed),
            len(ucfg.target_kinds),
        )  # fmt: skip
        held = HeldOut.build(inputs.heldout_forget, inputs.validation_texts, self.tokenizer, acfg.max_length)
        plan = self._plan(model, predictor, batches, rows, layer)
        self.log({"event": "planned", **plan.record()})
        # npo compares with the model before unlearning: its log-likelihood of each forget batch, taken now
        forget = [(b.input_ids, b.attention_mask) for b in batches]
        ref = reference_logprobs(model, forget) if ucfg.algorithm == "npo" else None
        model, params = make_trainable(model, layer, ucfg)
        dist.broadcast_(params.values())  # LoRA's adapters start random
        with self.view(model):
            if ucfg.budget_min_prob > 0 and dist.main:
                share = held.keep_predictable(model, ucfg.budget_min_prob)
                self.log({"event": "budget_tokens", "min_prob": ucfg.budget_min_prob, "share": share})
                if share == 0:
                    logger.warning("no held-out retain token has probability >= %s: the budget reads every token",
                                   ucfg.budget_min_prob)  # fmt: skip
            before = dist.from_main(held.retain_perplexity(model) if dist.main else 0.0)  # the first one decides
            forget_before = held.forget_perplexity(model) if dist.main else None
        return _Stages(model, params, layer, start.data, rows, start.vectors, batches, retain, held, plan,
                       ucfg.stage_steps(len(batches)), ref, before, forget_before)  # fmt: skip

    def _plan(self, model, predictor, batches, rows, layer: int) -> Plan:
        cfg, inputs = self.unlearn_cfg, self.inputs
        cosines = None
        if cfg.algorithm == "atu" and cfg.placed:
            retain_texts = (inputs.retain_texts or inputs.validation_texts)[:RETAIN_SAMPLE]
            with self.view(model):
                cosines = placement_cosines(
                    model, predictor, self.tokenizer, retain_texts, batches, rows, layer, self.align_cfg.max_length
                )
        return make_plan(cfg, inputs.concepts, rows.shape[0], cosines)

    def resume(self, s: _Stages, checkpoint: Checkpoint | None, predictor, replace_stale: bool):
        """(predictor, driving predictor, kept stages): from ``checkpoint`` when it holds some, its parameters loaded
        into the model; else ``predictor``, none and none."""
        with self.dist.main_first():
            resumed = checkpoint.load(replace_stale) if checkpoint is not None else None
        if resumed is None:
            return predictor, None, []
        device = next(s.model.parameters()).device
        with torch.no_grad():
            for n, t in resumed.params.items():
                s.params[n].copy_(t)
        driving = resumed.driving.to(device) if resumed.driving is not None else None
        for record in resumed.stages:  # the plan as the run left it: its steps halved where a stage broke the budget
            for _ in range(record.get("refines", 0)):
                s.plan.refine(record["stage"])
        logger.info("resumed after stage %d from %s", len(resumed.stages) - 1, checkpoint.path)
        self.log({"event": "resumed", "stages_done": len(resumed.stages)})
        return resumed.predictor.to(device), driving, resumed.stages

    def unlearn(self, s: _Stages, stage: int, frozen, cfg: UnlearnConfig):
        """Unlearn ``stage`` with the frozen predictor ``frozen``; a stage that breaks the retain budget is undone and
        tried again (``budget_retries`` times): a placed schedule at half the step down (`Plan.refine`), else at half
        the rate. Returns (step records, retain perplexity, its rise, the config the last try ran at, how many times
        the plan was refined); a rise over the budget means the stage is undone."""
        budget = self.unlearn_cfg.retain_budget
        snapshot = {n: p.detach().clone() for n, p in s.params.items()}
        refines = 0
        for attempt in range(self.unlearn_cfg.budget_retries + 1):
            with self.view(s.model):
                records = self._one_try(s, stage, frozen, cfg)
                val_ppl = self.dist.from_main(s.held.retain_perplexity(s.model) if self.dist.main else 0.0)
            rise = val_ppl / s.retain_before - 1
            self.log({"event": "validated", "stage": stage, "lr": _rate(cfg), "val_ppl": val_ppl, "rise": rise,
                      "thresholds": [round(float(t), 4) for t in s.plan.stage(stage)]})  # fmt: skip
            if rise <= budget:
                break
            with torch.no_grad():
                for n, p in s.params.items():
                    p.copy_(snapshot[n])
            if attempt == self.unlearn_cfg.budget_retries:
                break
            how = "half the step down" if s.plan.refinable else "half the rate"
            logger.info("stage %d broke the retain budget (%.1f%%); again at %s", stage, 100 * rise, how)
            if s.plan.refinable:
                s.plan.refine(stage)
                refines += 1
            else:
                cfg = replace(cfg, lr=cfg.lr / 2, baseline_lr=cfg.baseline_lr / 2)
        return records, val_ppl, rise, cfg, refines

    def _one_try(self, s: _Stages, stage: int, frozen, cfg: UnlearnConfig) -> list[dict]:
        thresholds = s.plan.stage(stage)
        if cfg.algorithm == "atu":
            inputs = StageInputs(frozen, s.layer, s.rows, thresholds, s.batches, s.retain)
            return unlearn_stage(
                s.model, inputs, cfg, list(s.params.values()), stage=stage, on_log=self.log, progress=self.progress,
                dist=self.dist,
            )  # fmt: skip
        # A baseline objective (unlearn.algorithm ga, gd or npo) on ATU's parameters and batches.
        base = BaselineConfig(
            method=cfg.algorithm, hook_layer=s.layer, steps=s.steps, lr=cfg.baseline_lr, optimizer="adam",
            batch_size=cfg.batch_size, grad_clip=cfg.grad_clip, beta=cfg.npo_beta, method_budget=cfg.method,
            seed=cfg.seed,
        )  # fmt: skip
        forget = [(b.input_ids, b.attention_mask) for b in s.batches]
        retain_batches = s.retain.batches if s.retain is not None else []
        return baseline_stage(
            s.model, list(s.params.values()), forget, retain_batches, s.ref, base, stage=stage, progress=self.progress
        )

    def realign(self, s: _Stages, predictor, stage: int) -> dict:
        """Re-align ``predictor`` to the model as it is after ``stage``; returns the alignment metrics."""
        train_h, val_h = alignment_hidden(s.model, s.data, s.layer, self.dist)
        metrics = train_predictor(
            predictor, s.data, train_h, self.align_cfg.realign_epochs, self.align_cfg, val_hidden=val_h,
            progress=self.progress and f"re-aligning after stage {stage}", dist=self.dist,
        )  # fmt: skip
        self.dist.broadcast_(predictor.state_dict().values())
        return metrics

    def stage(self, s: _Stages, stage: int, predictor, cfg: UnlearnConfig) -> _StageDone:
        """Unlearn ``stage`` against a frozen copy of ``predictor`` within the retain budget; if it holds, re-align
        ``predictor`` to the changed model and record the stage."""
        t_stage = time.time()
        frozen = copy.deepcopy(predictor).eval().requires_grad_(False)
        records, val_ppl, rise, cfg, refines = self.unlearn(s, stage, frozen, cfg)
        if rise > self.unlearn_cfg.retain_budget:  # the stage was undone
            kept = f"kept the model after stage {stage - 1}" if stage else "nothing unlearned"
            why = (
                f"stopped at stage {stage} ({s.plan.describe(stage)}): {self.inputs.validation_name} perplexity rose "
                f"{rise:.1%} (budget {self.unlearn_cfg.retain_budget:.0%}); undid that stage, {kept}"
            )
            return _StageDone(cfg, frozen, stop_reason=why)
        tried = (records, val_ppl, rise, time.time() - t_stage, refines)
        realign = self.realign(s, predictor, stage)
        with self.view(s.model):
            record = _stage_record(s, stage, cfg, tried, realign, t_stage, self.dist)
        self.log({"event": "stage_done", **record})
        return _StageDone(cfg, frozen, record)

    def keep(self, s: _Stages, stages: list[dict], predictor, driving, checkpoint: Checkpoint | None, on_stage):
        """After a kept stage: the checkpoint, and the caller's ``on_stage`` (e.g. a benchmark scoring each cut)."""
        if not self.dist.main:
            return
        if checkpoint is not None:
            checkpoint.save(s.params, predictor, driving, stages)
        if on_stage is not None:
            on_stage(stages[-1], model=s.model, predictor=predictor, concept_vectors=s.vectors, hook_layer=s.layer)

    def forgetting(self, s: _Stages, stages: list[dict]) -> dict:
        """Whether held-out texts about the concepts were forgotten, and how the schedule was placed."""
        last = stages[-1] if stages else {}
        failed, why = forgetting_verdict(last.get("heldout_forget_ppl_ratio"), 1 + last.get("rise", 0.0), len(stages))
        if failed:
            logger.warning("forgetting failed: %s", why)
        return {"failed": failed, "why": why, "heldout_forget_texts": len(self.inputs.heldout_forget),
                **s.plan.record()}  # fmt: skip


def _stage_record(
    s: _Stages, stage: int, cfg: UnlearnConfig, tried: tuple, realign: dict, t_stage: float, dist: Dist
) -> dict:
    """The record of a kept stage; ``tried`` is (step records, retain perplexity, its rise, unlearning seconds, how
    many times the plan was refined for it).
    Every process gets the first one's held-out forget ratio, so that they decide alike where to stop."""
    records, val_ppl, rise, t_unlearn, refines = tried
    forget_ppl = s.held.forget_perplexity(s.model) if s.forget_before is not None else None
    ratio = dist.from_main(math.nan if forget_ppl is None else forget_ppl / s.forget_before)
    return {
        "stage": stage,
        "tau": s.plan.headline(stage),
        "thresholds": [round(float(t), 4) for t in s.plan.stage(stage)],
        "lr": _rate(cfg),
        "steps": s.steps,
        "refines": refines,
        "val_ppl": val_ppl,
        "rise": rise,
        "heldout_forget_ppl_ratio": None if math.isnan(ratio) else ratio,
        "realign": realign,
        "last": records[-1] if records else {},
        "unlearn_seconds": round(t_unlearn, 1),
        "stage_seconds": round(time.time() - t_stage, 1),
    }


def _resumed_config(cfg: UnlearnConfig, stages: list[dict]) -> UnlearnConfig:
    """A resumed run goes on at the rate the last kept stage ran at."""
    if not stages or stages[-1].get("lr") is None:
        return cfg
    return replace(cfg, **{"lr" if cfg.algorithm == "atu" else "baseline_lr": stages[-1]["lr"]})


def run_schedule(
    model, tokenizer, encoder, inputs: ScheduleInputs, align_cfg: AlignConfig, unlearn_cfg: UnlearnConfig, *,
    start: ScheduleStart | None = None, options: ScheduleOptions | None = None,
) -> ScheduleResult:  # fmt: skip
    """Unlearn ``inputs.concepts`` from ``model`` stage by stage, from ``start`` (default: `schedule_start` here)."""
    _check_inputs(inputs, unlearn_cfg)
    opts = options or ScheduleOptions()
    dist = opts.dist
    with MetricsLog(opts.run_dir if dist.main else None) as log:
        sch = _Schedule(tokenizer, encoder, inputs, align_cfg, unlearn_cfg, opts, log)
        if start is None:
            start = schedule_start(model, tokenizer, encoder, inputs, align_cfg, unlearn_cfg, opts)
        log({"event": "aligned", **start.aligned.metrics})
        initial = copy.deepcopy(start.aligned.predictor)
        s = sch.setup(model, start)
        checkpoint = Checkpoint(opts.run_dir, checkpoint_key(inputs, align_cfg, unlearn_cfg)) if opts.run_dir else None
        predictor, driving, stages = sch.resume(s, checkpoint, start.aligned.predictor, opts.replace_stale)
        stop_reason = "schedule complete: every stage stayed within the retain budget"
        cfg = _resumed_config(unlearn_cfg, stages)
        going = floor_progress(stages, s.plan, unlearn_cfg)  # a resumed run that had levelled off stays stopped
        for stage in itertools.count(len(stages)):
            if going.stop:
                stop_reason = going.stop
                break
            if s.plan.stage(stage) is None:
                break
            done = sch.stage(s, stage, predictor, cfg)  # unlearn within the budget, re-align, record
            if done.undone:
                stop_reason = done.stop_reason
                break
            cfg, driving = done.cfg, done.driving
            stages.append(done.record)
            sch.keep(s, stages, predictor, driving, checkpoint, opts.on_stage)
            going = floor_progress(stages, s.plan, unlearn_cfg)
        forgetting = sch.forgetting(s, stages)
        logger.info("%s", stop_reason)
        log({"event": "stopped", "reason": stop_reason, "forgetting": forgetting})
    return ScheduleResult(
        s.model, predictor, driving, initial, s.vectors, s.layer, stages, stop_reason, start.aligned.metrics,
        forgetting, s.final_thresholds(stages),
    )  # fmt: skip
