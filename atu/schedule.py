"""The Align-then-Unlearn schedule: align, then alternate (unlearn at tau, check retain, re-align) with a falling
tau, and stop on a validation signal, never on evaluation probes.

Stopping rule: after each unlearning stage, perplexity on held-out retain texts is compared with its value before
unlearning. If it rose by more than ``retain_budget``, that stage is undone and the schedule stops with the model of
the previous stage. Every stage ends with a re-alignment, so the predictor that is kept (and exported) is aligned
to the model that is kept. The predictor that drove the last kept stage is kept too, for evaluation.

With a run directory, every kept stage is checkpointed (atomically) and a killed run resumes after the last
checkpointed stage; per-step metrics go to ``metrics.jsonl``.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from atu import cache
from atu.align import AlignConfig, alignment_hidden, new_predictor, prepare_alignment, train_predictor
from atu.atomic import replaced_dir
from atu.baselines import BaselineConfig, baseline_stage
from atu.distributed import SINGLE, Dist
from atu.errors import AtuError, ConfigError
from atu.formats import ConceptSet
from atu.hidden import attach_lora, decoder_layers, enable_checkpointing, freeze_above
from atu.predictor import EmbeddingPredictor, load_predictor, save_predictor
from atu.progress import HeldOut, forget_cosines, forgetting_verdict, text_cosines
from atu.thresholds import Placement, place_thresholds
from atu.unlearn import (
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


def _checkpoint_key(inputs: ScheduleInputs, align: AlignConfig, unlearn: UnlearnConfig) -> str:
    return cache.config_key(
        {
            "align": align.to_dict(),
            "unlearn": unlearn.to_dict(),
            "concepts": inputs.concepts.names(),
            "forget": inputs.forget_texts,
            "retain": inputs.retain_texts,
        }
    )


ALIGNED_DIR = "aligned"  # in a run directory: the predictor aligned to the model before unlearning (atu align)


def _aligned_key(model, encoder, inputs: ScheduleInputs, align: AlignConfig, layer: int) -> str:
    """What an alignment depends on: the model and the encoder (where they were loaded from, and their sizes), the
    alignment config and hook layer, and the texts."""
    return cache.config_key(
        {
            "align": align.to_dict(),
            "layer": layer,
            "model": [getattr(model.config, "_name_or_path", ""), model.config.hidden_size],
            "encoder": [getattr(encoder.tokenizer, "name_or_path", ""), encoder.get_embedding_dimension()],
            "texts": inputs.align_texts,
        }
    )


def _save_aligned(run_dir: Path, key: str, predictor, metrics: dict) -> None:
    with replaced_dir(run_dir / ALIGNED_DIR) as tmp:
        save_predictor(predictor, tmp / "predictor")
        state = {"key": key, "metrics": metrics}
        (tmp / "aligned.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")


def _load_aligned(run_dir: Path, key: str):
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
    model, tokenizer, encoder, inputs: ScheduleInputs, align_cfg: AlignConfig, *, run_dir: Path | None = None,
    progress: bool = True, dist: Dist = SINGLE, need_data: bool = True,
):  # fmt: skip
    """Align a new predictor to ``model`` (LM frozen), or reuse the one ``run_dir/aligned`` holds for the same model,
    texts and config; save it there. Returns (alignment data, predictor on the model's device, metrics); the data
    (what re-alignment trains on) is None when a predictor is reused and ``need_data`` is False (`atu align`)."""
    layer = align_cfg.resolve_layer(len(decoder_layers(model)))
    embedding_dim = encoder.get_embedding_dimension()
    device = next(model.parameters()).device
    key = _aligned_key(model, encoder, inputs, align_cfg, layer)
    reused = _load_aligned(run_dir, key) if run_dir is not None else None
    # Every process reads before the first one can write (it writes after the collective below): one decision.
    if dist.from_main(float(reused is not None)):
        if reused is None:
            raise AtuError(f"{run_dir / ALIGNED_DIR}: not seen by every process; the run directory must be shared")
        predictor, metrics = reused
        logger.info("reusing the aligned predictor in %s", run_dir / ALIGNED_DIR)
        data = (
            prepare_alignment(inputs.align_texts, tokenizer, encoder, align_cfg, progress=progress, dist=dist)
            if need_data
            else None
        )
        return data, predictor.to(device), {**metrics, "reused": True}
    t0 = time.time()
    data = prepare_alignment(inputs.align_texts, tokenizer, encoder, align_cfg, progress=progress, dist=dist)
    t_prepare = time.time() - t0
    predictor = new_predictor(align_cfg, model.config.hidden_size, embedding_dim).to(device)
    train_h, val_h = alignment_hidden(model, data, layer, dist)  # this process's share
    metrics = train_predictor(
        predictor, data, train_h, align_cfg.epochs, align_cfg, val_hidden=val_h, progress=progress, desc="aligning",
        dist=dist,
    )  # fmt: skip
    dist.broadcast_(predictor.state_dict().values())
    metrics.update(
        prepare_seconds=round(t_prepare, 1),
        align_seconds=round(time.time() - t0 - t_prepare, 1),
        windows=data.n_windows,
    )
    if run_dir is not None and dist.main:
        _save_aligned(run_dir, key, predictor, metrics)
    return data, predictor, metrics


def _save_checkpoint(run_dir: Path, key: str, params: dict[str, torch.Tensor], predictor, driving, stages) -> None:
    with replaced_dir(run_dir / "checkpoint") as tmp:
        save_file({n: t.detach().cpu().contiguous() for n, t in params.items()}, str(tmp / "trainable.safetensors"))
        save_predictor(predictor, tmp / "predictor")
        if driving is not None:
            save_predictor(driving, tmp / "driving_predictor")
        (tmp / "state.json").write_text(json.dumps({"key": key, "stages": stages}, indent=1, sort_keys=True) + "\n")


def _load_checkpoint(run_dir: Path, key: str, replace_stale: bool = False):
    ckpt = run_dir / "checkpoint"
    if not (ckpt / "state.json").is_file():
        return None
    try:
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("key") != key:
            if replace_stale:
                logger.warning("%s: checkpoint of a different run config; starting over", ckpt)
                return None
            raise AtuError(f"{ckpt}: checkpoint of a different run config; use another --run-dir or delete it")
        params = load_file(str(ckpt / "trainable.safetensors"))
        predictor = load_predictor(ckpt / "predictor")
        driving = load_predictor(ckpt / "driving_predictor") if (ckpt / "driving_predictor").is_dir() else None
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise AtuError(f"{ckpt}: corrupt checkpoint ({e}); delete it to start over") from None
    return params, predictor, driving, state["stages"]


def _trainable(model, layer: int, cfg: UnlearnConfig):
    """Set up what the unlearning may change; returns (model, {name: param})."""
    if cfg.method == "lora":
        model = attach_lora(model, layer, cfg.lora_rank, cfg.lora_alpha)
    else:
        freeze_above(model, layer, train_embeddings=cfg.train_embeddings)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model, {n: p for n, p in model.named_parameters() if p.requires_grad}


RETAIN_SAMPLE = 256  # retain texts whose cosines place the floor of a placed schedule


@dataclass
class Plan:
    """The thresholds of every stage, per target row (kind-major), and how they were chosen."""

    taus: list[torch.Tensor]  # per stage, (R,)
    kinds: list[str]
    placement: Placement | None = None  # None: the absolute schedule (unlearn.taus), or a baseline's stages
    algorithm: str = "atu"
    extra: int = 0  # placed schedule: stages past the floor, at the same step, while forgetting still progresses
    concept_floor: torch.Tensor | None = None  # (R,) each row's concept's own threshold, else -1

    def stage(self, stage: int) -> torch.Tensor | None:
        """The thresholds of ``stage`` (R,), or None past the last one. Past the floor a placed schedule steps on
        at the same rate (idle rows stay at their start, a concept's own threshold stays a floor)."""
        if stage < len(self.taus):
            return self.taus[stage]
        if self.placement is None or stage >= len(self.taus) + self.extra:
            return None
        p, n = self.placement, len(self.taus)
        taus = (p.start - (p.start - p.floor) * (stage + 1) / n).clamp(min=-1.0)
        taus = torch.where(p.idle, p.start, taus)
        return taus if self.concept_floor is None else torch.maximum(taus, self.concept_floor)

    def headline(self, stage: int) -> float:
        """One number for a stage: its highest threshold (the absolute schedule's tau)."""
        return round(float(self.stage(stage).max()), 4)

    def describe(self, stage: int) -> str:
        if self.placement is None:
            return f"tau={self.headline(stage)}"
        return f"thresholds {', '.join(f'{t:.2f}' for t in self.stage(stage).tolist())}"

    def record(self) -> dict:
        kind = "placed" if self.placement is not None else "absolute" if self.algorithm == "atu" else "baseline"
        out: dict = {"schedule": kind, "algorithm": self.algorithm, "target_kinds": self.kinds}
        if self.placement is not None:
            p = self.placement
            out.update(start=p.start.tolist(), floor=p.floor.tolist(), idle=p.idle.tolist())
        return out


def _levelled_off(stages: list[dict], plan: Plan, cfg: UnlearnConfig, dist: Dist) -> str | None:
    """Past the placed floor, the schedule goes on only while held-out forget perplexity still rises by
    ``cfg.progress_min`` a stage (and the retain budget holds): the stop reason once it does not, else None."""
    stage = stages[-1]["stage"]
    if plan.placement is None or stage < len(plan.taus) - 1 or len(stages) < 2:
        return None
    now, prev = stages[-1]["heldout_forget_ppl_ratio"], stages[-2]["heldout_forget_ppl_ratio"]
    gain = dist.from_main(now / prev - 1 if dist.main and now is not None and prev is not None else -1.0)
    if gain >= cfg.progress_min:
        return None
    return (
        f"forgetting levelled off after stage {stage}: held-out forget perplexity rose {gain:+.1%} in its last stage "
        f"(needs {cfg.progress_min:.0%} to go on)"
    )


def _rate(cfg: UnlearnConfig) -> float:
    """The learning rate a stage runs at: ATU's, or the baseline's."""
    return cfg.lr if cfg.algorithm == "atu" else cfg.baseline_lr


def _baseline_stage(model, params, batches, retain, ref, cfg: UnlearnConfig, layer, steps, stage, progress):
    """One stage of a baseline objective (unlearn.algorithm ga, gd or npo) on ATU's parameters and batches."""
    base = BaselineConfig(
        method=cfg.algorithm, hook_layer=layer, steps=steps, lr=cfg.baseline_lr, optimizer="adam",
        batch_size=cfg.batch_size, grad_clip=cfg.grad_clip, beta=cfg.npo_beta, method_budget=cfg.method,
        seed=cfg.seed,
    )  # fmt: skip
    forget = [(b.input_ids, b.attention_mask) for b in batches]
    retain_batches = retain.batches if retain is not None else []
    return baseline_stage(
        model, list(params.values()), forget, retain_batches, ref, base, stage=stage, progress=progress
    )


def _plan(model, predictor, tokenizer, inputs: ScheduleInputs, cfg: UnlearnConfig, batches, rows, layer, max_length):
    """The stages' thresholds: the configured taus, or placed from the aligned predictor's cosines on the forget
    texts and on a sample of retain texts (the corpus' own, else the stop signal's). A baseline has no thresholds:
    ``cfg.stages`` stages of zeros, so that it runs as many budget-checked stages."""
    kinds = cfg.target_kinds
    if cfg.algorithm != "atu":
        return Plan([torch.zeros(rows.shape[0])] * cfg.stages, kinds, algorithm=cfg.algorithm)
    if not cfg.placed:
        return Plan([cfg.stage_thresholds(t, inputs.concepts).repeat(len(kinds)) for t in cfg.taus], kinds)
    retain_texts = (inputs.retain_texts or inputs.validation_texts)[:RETAIN_SAMPLE]
    was_training = model.training
    model.eval()
    forget_cos = forget_cosines(model, predictor, batches, rows, layer)
    retain_cos = text_cosines(model, predictor, tokenizer, retain_texts, rows, layer, max_length)
    model.train(was_training)
    placement = place_thresholds(
        forget_cos, retain_cos, cfg.stages, cfg.start_quantile, cfg.floor_quantile, cap_quantile=cfg.floor_cap_quantile
    )
    idle = [inputs.concepts.names()[r % len(inputs.concepts.concepts)] for r in placement.idle.nonzero().flatten()]
    if idle:
        logger.warning("the aligned predictor does not single out %s on its own texts: little to push", idle)
    floors = cfg.stage_thresholds(-1.0, inputs.concepts).repeat(len(kinds))  # a concept's own threshold, else -1
    taus = [torch.maximum(t, floors) for t in placement.taus]
    return Plan(taus, kinds, placement, extra=cfg.extra_stages, concept_floor=floors)


def run_schedule(
    model,
    tokenizer,
    encoder,
    inputs: ScheduleInputs,
    align_cfg: AlignConfig,
    unlearn_cfg: UnlearnConfig,
    *,
    run_dir: Path | None = None,
    progress: bool = True,
    replace_stale: bool = False,
    on_stage: Callable[..., None] | None = None,
    dist: Dist = SINGLE,
) -> ScheduleResult:
    if not inputs.forget_texts:
        raise ConfigError("no forget texts: the corpus has no text about the concepts to forget")
    if not inputs.validation_texts:
        raise ConfigError("no held-out retain texts: the schedule needs them to decide where to stop")
    if unlearn_cfg.uses_retain and not inputs.retain_texts:
        raise ConfigError(
            "unlearn.retain_weight or unlearn.retain_similarity_weight is set but there are no retain texts to train "
            "it on (corpus texts about no forgotten concept, besides those the stopping signal and evaluation read)"
        )
    layer = align_cfg.resolve_layer(len(decoder_layers(model)))
    key = _checkpoint_key(inputs, align_cfg, unlearn_cfg)
    device = next(model.parameters()).device
    progress = progress and dist.main
    metrics_file = None
    if run_dir is not None and dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def log(rec: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(rec, sort_keys=True) + "\n")
            metrics_file.flush()

    try:
        data, predictor, align_metrics = initial_alignment(
            model, tokenizer, encoder, inputs, align_cfg, run_dir=run_dir, progress=progress, dist=dist
        )
        log({"event": "aligned", **align_metrics})
        initial = copy.deepcopy(predictor)

        kinds = unlearn_cfg.target_kinds
        window_texts = None
        if {"centroid", "contrast"} & set(kinds):
            window_texts = concept_window_texts(
                len(inputs.concepts.concepts), inputs.forget_texts, inputs.centroid_rows(), tokenizer, encoder,
                align_cfg.window, align_cfg.max_length,
            )  # fmt: skip
        rows = target_rows(inputs.concepts, encoder, kinds, window_texts, background=data.targets.mean(0))  # (R, D)
        n_concepts = len(inputs.concepts.concepts)
        vectors = rows[:n_concepts]  # the first kind's: what reports and evaluation read, one row per concept

        # Before anything is trained: the retain terms' references are the original model's states and the aligned
        # predictor's cosines on them.
        retain = build_retain_set(
            inputs.retain_texts, tokenizer, align_cfg.max_length, unlearn_cfg, model, layer, predictor, rows
        )
        batches = expand_rows(
            forget_batches(
                inputs.forget_texts, inputs.forget_concepts, n_concepts, tokenizer, align_cfg.max_length,
                unlearn_cfg.batch_size, unlearn_cfg.seed,
            ),
            len(kinds),
        )  # fmt: skip
        held = HeldOut.build(inputs.heldout_forget, inputs.validation_texts, tokenizer, align_cfg.max_length)
        plan = _plan(model, predictor, tokenizer, inputs, unlearn_cfg, batches, rows, layer, align_cfg.max_length)
        log({"event": "planned", **plan.record()})
        steps = unlearn_cfg.stage_steps(len(batches))
        # npo compares with the model before unlearning
        ref = copy.deepcopy(model).eval().requires_grad_(False) if unlearn_cfg.algorithm == "npo" else None
        model, params = _trainable(model, layer, unlearn_cfg)
        dist.broadcast_(params.values())  # LoRA's adapters start random
        before = dist.from_main(held.retain_perplexity(model) if dist.main else 0.0)  # the first one decides
        forget_before = held.forget_perplexity(model) if dist.main else None

        stages: list[dict] = []
        driving: EmbeddingPredictor | None = None
        with dist.main_first():
            resumed = _load_checkpoint(run_dir, key, replace_stale) if run_dir is not None else None
        if resumed is not None:
            saved, predictor, driving, stages = resumed
            predictor = predictor.to(device)
            driving = driving.to(device) if driving is not None else None
            with torch.no_grad():
                for n, t in saved.items():
                    params[n].copy_(t)
            logger.info("resumed after stage %d from %s", len(stages) - 1, run_dir / "checkpoint")
            log({"event": "resumed", "stages_done": len(stages)})
        stop_reason = "schedule complete: every stage stayed within the retain budget"
        cfg = unlearn_cfg
        if stages and stages[-1].get("lr") is not None:  # resumed: at the rate the last kept stage ran at
            key_lr = "lr" if cfg.algorithm == "atu" else "baseline_lr"
            cfg = replace(cfg, **{key_lr: stages[-1]["lr"]})
        for stage in itertools.count():
            thresholds = plan.stage(stage)
            if thresholds is None:
                break
            if stage < len(stages):
                continue
            t_stage = time.time()
            snapshot = {n: p.detach().clone() for n, p in params.items()}
            frozen = copy.deepcopy(predictor).eval().requires_grad_(False)
            for attempt in range(unlearn_cfg.budget_retries + 1):
                if cfg.algorithm == "atu":
                    records = unlearn_stage(
                        model, frozen, batches, rows, thresholds, layer, cfg, list(params.values()), stage=stage,
                        steps=steps, step_offset=stage * steps, retain=retain, on_log=log, progress=progress,
                        dist=dist,
                    )  # fmt: skip
                else:
                    records = _baseline_stage(model, params, batches, retain, ref, cfg, layer, steps, stage, progress)
                val_ppl = dist.from_main(held.retain_perplexity(model) if dist.main else 0.0)
                rise = val_ppl / before - 1
                log({"event": "validated", "stage": stage, "lr": _rate(cfg), "val_ppl": val_ppl, "rise": rise})
                if rise <= unlearn_cfg.retain_budget:
                    break
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(snapshot[n])
                if attempt < unlearn_cfg.budget_retries:
                    logger.info("stage %d broke the retain budget (%.1f%%); again at half the rate", stage, 100 * rise)
                    cfg = replace(cfg, lr=cfg.lr / 2, baseline_lr=cfg.baseline_lr / 2)
            t_unlearn = time.time() - t_stage
            if rise > unlearn_cfg.retain_budget:
                kept = f"kept the model after stage {stage - 1}" if stage else "nothing unlearned"
                stop_reason = (
                    f"stopped at stage {stage} ({plan.describe(stage)}): {inputs.validation_name} perplexity rose "
                    f"{rise:.1%} (budget {unlearn_cfg.retain_budget:.0%}); undid that stage, {kept}"
                )
                break
            train_h, val_h = alignment_hidden(model, data, layer, dist)
            realign = train_predictor(
                predictor, data, train_h, align_cfg.realign_epochs, align_cfg, val_hidden=val_h, progress=progress,
                desc=f"re-aligning after stage {stage}", dist=dist,
            )  # fmt: skip
            dist.broadcast_(predictor.state_dict().values())
            driving = frozen
            forget_ppl = held.forget_perplexity(model) if dist.main else None
            stages.append(
                {
                    "stage": stage,
                    "tau": plan.headline(stage),
                    "thresholds": [round(float(t), 4) for t in thresholds],
                    "lr": _rate(cfg),
                    "steps": steps,
                    "val_ppl": val_ppl,
                    "rise": rise,
                    "heldout_forget_ppl_ratio": None if forget_ppl is None else forget_ppl / forget_before,
                    "realign": realign,
                    "last": records[-1] if records else {},
                    "unlearn_seconds": round(t_unlearn, 1),
                    "stage_seconds": round(time.time() - t_stage, 1),
                }
            )
            log({"event": "stage_done", **stages[-1]})
            if run_dir is not None and dist.main:
                _save_checkpoint(run_dir, key, params, predictor, driving, stages)
            # e.g. a benchmark scoring each strength of the schedule from one run
            if on_stage is not None and dist.main:
                on_stage(stages[-1], model=model, predictor=predictor, concept_vectors=vectors, hook_layer=layer)
            levelled = _levelled_off(stages, plan, unlearn_cfg, dist)
            if levelled:
                stop_reason = levelled
                break
        last = stages[-1] if stages else {}
        failed, why = forgetting_verdict(last.get("heldout_forget_ppl_ratio"), 1 + last.get("rise", 0.0), len(stages))
        forgetting = {
            "failed": failed,
            "why": why,
            "heldout_forget_texts": len(inputs.heldout_forget),
            **plan.record(),
        }
        if failed:
            logger.warning("forgetting failed: %s", why)
        logger.info("%s", stop_reason)
        log({"event": "stopped", "reason": stop_reason, "forgetting": forgetting})
    finally:
        if metrics_file is not None:
            metrics_file.close()
    final = stages[-1]["thresholds"][:n_concepts] if stages else plan.taus[0][:n_concepts].tolist()
    return ScheduleResult(
        model, predictor, driving, initial, vectors, layer, stages, stop_reason, align_metrics, forgetting, final
    )
