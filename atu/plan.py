"""The thresholds of every unlearning stage (a `Plan`): the configured taus, or placed from the aligned predictor's
cosines on forget and retain texts; and when a placed schedule stops going on past its floor."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from atu.formats import ConceptSet
from atu.progress import forget_cosines, text_cosines
from atu.thresholds import Placement, place_thresholds
from atu.unlearn import UnlearnConfig

logger = logging.getLogger(__name__)


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
    scale: float = 1.0  # placed schedule: the step as a share of the planned one (halved by each `refine`)

    def stage(self, stage: int) -> torch.Tensor | None:
        """The thresholds of ``stage`` (R,), or None past the last one. Past the floor a placed schedule steps on
        at the same step (idle rows stay at their start, a concept's own threshold stays a floor)."""
        if stage < len(self.taus):
            return self.taus[stage]
        if self.placement is None or stage >= len(self.taus) + self.extra:
            return None
        p = self.placement
        step = (p.start - p.floor) / p.taus.shape[0] * self.scale
        taus = (self.taus[-1] - step * (stage + 1 - len(self.taus))).clamp(min=-1.0)
        taus = torch.where(p.idle, p.start, taus)
        return taus if self.concept_floor is None else torch.maximum(taus, self.concept_floor)

    @property
    def refinable(self) -> bool:
        """Whether a stage over the retain budget is tried again at half the step (else at half the rate)."""
        return self.placement is not None

    def refine(self, stage: int) -> None:
        """Halve the step from ``stage`` on: ``stage`` becomes the halfway point between the last stage (or the
        start) and where it was, and every later step is halved too (twice as many stages, the same floor). A hinge
        run to its threshold ends where the threshold is, whatever the rate: a smaller push needs a nearer one."""
        if not self.refinable or self.stage(stage) is None:
            raise ValueError(f"stage {stage} of this plan cannot be refined")
        past = [self.stage(k) for k in range(len(self.taus), stage)]  # stages past the floor already run
        self.taus, self.extra = [*self.taus, *past], self.extra - len(past)
        p = self.placement
        prev = [p.start, *self.taus]  # the thresholds before each stage
        ahead = [t for k in range(stage, len(self.taus)) for t in ((prev[k] + self.taus[k]) / 2, self.taus[k])]
        self.taus = [*self.taus[:stage], *ahead]
        self.extra, self.scale = 2 * self.extra, self.scale / 2

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


def specific_forgetting(record: dict) -> float | None:
    """How much harder a stage left held-out texts about the concepts than held-out retain texts: the ratio of their
    perplexity ratios to before unlearning (a model that drifts raises both alike; one that gets better at everything
    lowers both). None without held-out forget texts."""
    ratio = record.get("heldout_forget_ppl_ratio")
    return None if ratio is None else ratio / (1 + record["rise"])


@dataclass
class Progress:
    """Where a placed schedule stands from its floor on: the stop reason (None: go on), and the stage that forgot
    the most since the floor."""

    stop: str | None = None
    best: int | None = None


def floor_progress(stages: list[dict], plan: Plan, cfg: UnlearnConfig) -> Progress:
    """From the placed floor on, the schedule goes on while held-out forgetting still progresses: a stage that beats
    the best stage since the floor by ``cfg.progress_min`` becomes the best; after ``cfg.progress_patience`` stages in
    a row that do not, the schedule stops (on the last stage: each stage pushed further than the one before within
    the retain budget, and a few held-out sentences are too thin a signal to go back by). One stage that does not is
    not a stop: a step that moves little is often followed by one that moves more."""
    if plan.placement is None or not stages or stages[-1]["stage"] < len(plan.taus) - 1:
        return Progress()
    since = [r for r in stages if r["stage"] >= len(plan.taus) - 1]
    if specific_forgetting(since[0]) is None:
        return Progress("reached the floor; no held-out forget texts to tell whether going on past it forgets more")
    best = since[0]
    for r in since[1:]:
        if specific_forgetting(r) >= specific_forgetting(best) * (1 + cfg.progress_min):
            best = r
    misses = stages[-1]["stage"] - best["stage"]
    if misses < cfg.progress_patience:
        return Progress(best=best["stage"])
    return Progress(
        f"forgetting levelled off: no stage since stage {best['stage']} made held-out forget texts "
        f"{cfg.progress_min:.0%} harder to predict against held-out retain texts ({misses} tried)",
        best["stage"],
    )


def placement_cosines(
    model, predictor, tokenizer, retain_texts: list[str], batches, rows, layer: int, max_length: int
):
    """(forget cosines, retain cosines): the aligned predictor's cosines to each target row on the forget batches and
    on ``retain_texts``, the two samples a placed schedule is placed between (the model is read in eval mode)."""
    was_training = model.training
    model.eval()
    forget_cos = forget_cosines(model, predictor, batches, rows, layer)
    retain_cos = text_cosines(model, predictor, tokenizer, retain_texts, rows, layer, max_length)
    model.train(was_training)
    return forget_cos, retain_cos


def make_plan(cfg: UnlearnConfig, concepts: ConceptSet, n_rows: int, cosines=None) -> Plan:
    """The stages' thresholds: the configured taus, or placed from ``cosines`` (`placement_cosines`, needed only
    when ``cfg.placed``). A baseline has no thresholds: ``cfg.stages`` stages of zeros, so that it runs as many
    budget-checked stages."""
    kinds = cfg.target_kinds
    if cfg.algorithm != "atu":
        return Plan([torch.zeros(n_rows)] * cfg.stages, kinds, algorithm=cfg.algorithm)
    if not cfg.placed:
        return Plan([cfg.stage_thresholds(t, concepts).repeat(len(kinds)) for t in cfg.taus], kinds)
    forget_cos, retain_cos = cosines
    placement = place_thresholds(
        forget_cos, retain_cos, cfg.stages, cfg.start_quantile, cfg.floor_quantile, cap_quantile=cfg.floor_cap_quantile
    )
    idle = [concepts.names()[r % len(concepts.concepts)] for r in placement.idle.nonzero().flatten()]
    if idle:
        logger.warning("the aligned predictor does not single out %s on its own texts: little to push", idle)
    floors = cfg.stage_thresholds(-1.0, concepts).repeat(len(kinds))  # a concept's own threshold, else -1
    taus = [torch.maximum(t, floors) for t in placement.taus]
    return Plan(taus, kinds, placement, extra=cfg.extra_stages, concept_floor=floors)
