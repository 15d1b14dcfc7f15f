"""Unlearning: fine-tune the LM (layers up to L) so that the frozen predictor's output on texts about a concept
stays below the concept's threshold: ``mean relu(cos(E(h_L)_t, c) - tau)``.

This module holds the config, the concept targets and one unlearning stage; `atu.schedule` alternates stages
with re-alignment and decides where to stop.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from atu.configs import dataclass_from_dict
from atu.distributed import SINGLE, Dist
from atu.errors import ConfigError
from atu.formats import ConceptSet
from atu.hidden import hidden_at
from atu.losses import concept_similarity, similarity_drift_loss, state_drift_loss, unlearning_loss
from atu.texts import content_mask, lm_loss, tokenize_texts
from atu.unpad import by_length

logger = logging.getLogger(__name__)

TARGETS = ("name", "description", "centroid", "contrast")
ALGORITHMS = ("atu", "ga", "gd", "npo")
OPTIMIZERS = ("sgd", "adam")
METHODS = ("full", "lora")
RETAIN_LOSSES = ("hidden", "lm")


@dataclass
class UnlearnConfig:
    """The unlearning schedule. Plain SGD with a large step and clipping: it stops by itself once every position is
    under the threshold, where Adam's momentum keeps changing the model after the hinge reaches zero."""

    # atu (the method), or a baseline on the same data, parameters, retain budget and export: ga (gradient ascent
    # on the forget texts), gd (ga plus the retain texts' LM loss), npo (negative preference optimisation).
    algorithm: str = "atu"
    baseline_lr: float = 1e-5  # the baselines' Adam learning rate (atu uses lr and optimizer)
    npo_beta: float = 0.1  # npo's inverse temperature
    # One unlearning stage per tau (the paper's absolute schedule). None (the default): ``stages`` thresholds per
    # target row placed from the aligned predictor's cosines (atu/thresholds.py): from the top of the row's cosines
    # on its forget texts down to where retain texts already sit.
    taus: list[float] | None = None
    stages: int = 6  # stages of the placed schedule (taus: None)
    start_quantile: float = 0.99  # placed schedule: quantile of a row's forget-text cosines it starts from
    floor_quantile: float = 0.99  # placed schedule: quantile of a row's retain-text cosines it ends at
    # Placed schedule: the floor never lies above this quantile of the row's own forget-text cosines, so a concept
    # whose texts do not stand out at the top still has its upper half pushed (1.0: no cap).
    floor_cap_quantile: float = 0.5
    # Placed schedule: at most this many stages past the floor, at the same step, while the retain budget holds and
    # forgetting still progresses: a stage that makes held-out forget texts progress_min harder to predict (against
    # held-out retain texts) than the best stage since the floor becomes the best; after progress_patience stages in
    # a row that do not, the schedule stops (on its last stage).
    extra_stages: int = 6
    progress_min: float = 0.05  # placed schedule: how much a stage must beat the best since the floor by to count
    progress_patience: int = 2  # placed schedule: stages in a row that do not, before the schedule stops
    # Optimizer steps in each stage. None: ``stage_epochs`` passes over the forget batches, at least ``min_steps``.
    steps_per_stage: int | None = None
    stage_epochs: float = 20.0  # steps_per_stage null: passes over the forget batches a stage
    min_steps: int = 40  # steps_per_stage null: at least this many steps a stage
    lr: float = 0.3
    optimizer: str = "sgd"  # sgd | adam (the paper: SGD)
    grad_clip: float = 1.0
    batch_size: int = 16
    method: str = "full"  # full: fine-tune layers 0..L-1; lora: LoRA adapters on them, merged at export
    lora_rank: int = 8
    lora_alpha: int = 16
    train_embeddings: bool = False  # also fine-tune the input embeddings (tied to the LM head in small models)
    # What the hinge pushes away from, per concept: name | description | centroid (of the forget texts' windows) |
    # contrast (that centroid minus the mean window), or several joined by "+" (one target row each): the name
    # alone misses facts that sit far from it; facts alone leave the name to be recalled from a description.
    target: str = "name+contrast"
    # Weight of a retain term added to each step (0: off, the paper's hinge alone). 1 puts the hinge and the retain
    # states' relative drift in the same units. Without it, a push on one concept's texts moves what the model says
    # about the people it keeps while held-out perplexity, the budget's signal, can even fall.
    retain_weight: float = 1.0
    retain_loss: str = "hidden"  # hidden: keep layer-L states of retain texts where they were; lm: their LM loss
    # Weight of a second retain term (0: off): keep the stage's predictor's similarity to each concept on retain
    # texts where the aligned predictor put it on the original model, so that the push away from the concept stays
    # specific to the texts about it instead of lowering every text's similarity.
    retain_similarity_weight: float = 0.0
    retain_similarity_margin: float = 0.0  # a retain position's cosine may move this far before the term counts it
    retain_pool: int = 512  # retain texts the retain term cycles through (their reference states are kept in memory)
    retain_budget: float = 0.10  # stop when held-out retain perplexity rises by more than this fraction
    # The budget's perplexity over only the held-out retain tokens the original model gives at least this probability
    # (0: every token). A small model cannot predict most tokens of phrasings it never saw; their perplexity moves a
    # lot either way with any change to the model and says nothing of what it knows. The progress signal reads the
    # same perplexity.
    budget_min_prob: float = 0.1
    # A stage that breaks the budget is undone and tried again, this many times, before the schedule stops: with a
    # placed schedule at half the step down (and the steps after it halved too), else at half the learning rate
    # (which stays halved for the stages after it).
    budget_retries: int = 2
    # Quantization-aware unlearning: the unlearning steps, the retain budget and the forgetting signal see the model's
    # decoder Linear weights through symmetric round-to-nearest at this many bits (4 or 8; None: off), one step per
    # output channel or per quant_aware_group_size input columns: what is pushed is the model as it will be served
    # quantized (the straight-through estimator updates the full-precision weights). method full only.
    quant_aware_bits: int | None = None
    quant_aware_group_size: int | None = None  # quant_aware_bits: one step per this many input columns (None: per row)
    # Relearning-aware unlearning (0: off): each step's hinge is taken where relearning would take the weights, the
    # trained weights moved by this much each against the sign of their gradient of the forget texts' next-token loss
    # (an attacker's first Adam step at this learning rate), relearn_steps times, and its gradient applied to the
    # weights as they are. The plain hinge stops pushing once the states are under the threshold, where a few steps of
    # fine-tuning on related facts bring them back; this one pushes until they stay under it from there. atu only.
    relearn_rho: float = 0.0
    relearn_steps: int = 1  # relearn_rho > 0: the attacker's steps, each at rate relearn_rho on a fresh gradient
    log_every: int = 10
    seed: int = 0
    bf16: bool = True  # autocast to bfloat16 when on a GPU (ignored on CPU)
    gradient_checkpointing: bool = False  # on GPU, for models that do not fit otherwise

    def __post_init__(self) -> None:
        if self.taus is not None:
            if not self.taus or any(not -1 <= t <= 1 for t in self.taus):
                raise ConfigError(f"unlearn.taus must be a non-empty list of cosines in [-1, 1], got {self.taus}")
            if any(later > earlier for later, earlier in zip(self.taus[1:], self.taus)):
                raise ConfigError(f"unlearn.taus must not rise from one stage to the next, got {self.taus}")
        for name, allowed in (
            ("algorithm", ALGORITHMS),
            ("optimizer", OPTIMIZERS),
            ("method", METHODS),
            ("retain_loss", RETAIN_LOSSES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unlearn.{name} is {getattr(self, name)!r}, expected one of {allowed}")
        kinds = self.target_kinds
        if not kinds or any(k not in TARGETS for k in kinds) or len(set(kinds)) != len(kinds):
            raise ConfigError(
                f"unlearn.target is {self.target!r}, expected one of {TARGETS} or several of them joined by '+'"
            )
        steps = self.steps_per_stage if self.steps_per_stage is not None else self.min_steps
        if min(steps, self.min_steps, self.stages, self.batch_size, self.log_every, self.retain_pool) < 1:
            raise ConfigError(
                "unlearn.steps_per_stage, min_steps, stages, batch_size, log_every and retain_pool must be >= 1"
            )
        if self.extra_stages < 0 or self.progress_min < 0 or self.progress_patience < 1:
            raise ConfigError(
                "unlearn.extra_stages and progress_min must be >= 0 and progress_patience >= 1, got "
                f"{self.extra_stages}, {self.progress_min}, {self.progress_patience}"
            )
        if not 0 <= self.budget_min_prob < 1:
            raise ConfigError(f"unlearn.budget_min_prob must be in [0, 1), got {self.budget_min_prob}")
        if not self.stage_epochs > 0 or self.budget_retries < 0:
            raise ConfigError(
                f"unlearn.stage_epochs must be > 0 and budget_retries >= 0, got {self.stage_epochs}, "
                f"{self.budget_retries}"
            )
        if self.quant_aware_bits is not None:
            from atu.attack.quantize import QuantConfig

            QuantConfig(self.quant_aware_bits, self.quant_aware_group_size)  # validates bits and group size
            if self.method != "full":
                raise ConfigError("unlearn.quant_aware_bits needs unlearn.method full (LoRA is not quantized)")
        for name in ("start_quantile", "floor_quantile", "floor_cap_quantile"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"unlearn.{name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.lr, self.grad_clip, self.baseline_lr, self.npo_beta) <= 0:
            raise ConfigError(
                f"unlearn.lr, grad_clip, baseline_lr and npo_beta must be > 0, got {self.lr}, {self.grad_clip}, "
                f"{self.baseline_lr}, {self.npo_beta}"
            )
        if min(self.retain_weight, self.retain_similarity_weight, self.retain_similarity_margin) < 0:
            raise ConfigError(
                "unlearn.retain_weight, unlearn.retain_similarity_weight and unlearn.retain_similarity_margin must be "
                f"a number >= 0, got {self.retain_weight}, {self.retain_similarity_weight}, "
                f"{self.retain_similarity_margin}"
            )
        if self.retain_budget <= 0:
            raise ConfigError(f"unlearn.retain_budget must be > 0, got {self.retain_budget}")
        self._check_relearn_aware()

    def _check_relearn_aware(self) -> None:
        rho, steps = self.relearn_rho, self.relearn_steps
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or rho < 0:
            raise ConfigError(f"unlearn.relearn_rho must be a number >= 0, got {rho!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"unlearn.relearn_steps must be an int >= 1, got {steps!r}")
        if rho > 0 and self.algorithm != "atu":
            raise ConfigError(f"unlearn.relearn_rho needs unlearn.algorithm atu, got {self.algorithm!r}")

    @property
    def target_kinds(self) -> list[str]:
        return [k.strip() for k in str(self.target).split("+")]

    @property
    def placed(self) -> bool:
        """Whether the thresholds are placed from the data (no absolute taus)."""
        return self.taus is None

    def stage_steps(self, n_batches: int) -> int:
        """Optimizer steps of one stage over ``n_batches`` forget batches."""
        if self.steps_per_stage is not None:
            return self.steps_per_stage
        return max(self.min_steps, math.ceil(self.stage_epochs * n_batches))

    @property
    def uses_retain(self) -> bool:
        """Whether a step adds a retain term."""
        return self.retain_weight > 0 or self.retain_similarity_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnlearnConfig:
        return dataclass_from_dict(cls, data, "unlearn")

    def stage_thresholds(self, tau: float | torch.Tensor, concepts: ConceptSet) -> torch.Tensor:
        """Each concept's threshold in a stage: the stage's tau (one number, or one per concept), never below the
        concept's own threshold."""
        taus = torch.as_tensor(tau, dtype=torch.float32).expand(len(concepts.concepts)).clone()
        for i, c in enumerate(concepts.concepts):
            if c.threshold is not None:
                taus[i] = max(float(taus[i]), c.threshold)
        return taus

    def final_thresholds(self, concepts: ConceptSet) -> torch.Tensor:
        """The absolute schedule's last thresholds (a placed schedule's are in the run's result)."""
        if self.taus is None:
            raise ValueError("a placed schedule's thresholds come from the data: read them from the schedule's result")
        return self.stage_thresholds(self.taus[-1], concepts)


# ------------------------------------------------------------------------------------------- forget texts


@dataclass
class ForgetBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_mask: torch.Tensor  # (B, T) bool: real tokens except the first (BOS carries no text)
    concept_mask: torch.Tensor  # (B, C) bool: which concepts each text is about


def forget_batches(
    texts: list[str],
    concepts_of_text: list[list[int]],
    n_concepts: int,
    tokenizer,
    max_length: int,
    batch_size: int,
    seed: int,
) -> list[ForgetBatch]:
    """Fixed, shuffled batches of forget texts; ``concepts_of_text[i]`` lists the concept rows text i is about."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, attn = tokenize_texts([texts[i] for i in idx], tokenizer, max_length)
        pos = content_mask(input_ids, attn, tokenizer.bos_token_id)
        cmask = torch.zeros((len(idx), n_concepts), dtype=torch.bool)
        for row, i in enumerate(idx):
            cmask[row, concepts_of_text[i]] = True
        out.append(ForgetBatch(input_ids, attn, pos, cmask))
    return out


@dataclass
class RetainSet:
    """Retain texts in fixed, shuffled batches: the optional retain terms cycle through them (one batch a step) and
    the first batch is where similarity to the concepts on retain texts is logged."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (input_ids, attention_mask)
    masks: list[torch.Tensor]  # (B, T) bool: real tokens except BOS
    reference: list[torch.Tensor] | None = None  # layer-L states before unlearning, per batch (retain_loss hidden)
    similarity: list[torch.Tensor] | None = None  # (B, T, C) concept cosines before unlearning, per batch

    def pick(self, step: int) -> int:
        return step % len(self.batches)


def build_retain_set(
    texts: list[str],
    tokenizer,
    max_length: int,
    cfg: UnlearnConfig,
    model=None,
    layer: int | None = None,
    predictor=None,
    concept_vectors: torch.Tensor | None = None,
) -> RetainSet | None:
    """Batches of up to ``cfg.retain_pool`` retain texts, and what the retain terms compare against, taken now
    (before unlearning) and kept on the CPU: with ``retain_loss: hidden`` and a retain weight, ``model``'s
    layer-``layer`` states; with a similarity weight, ``predictor``'s cosines to ``concept_vectors`` on them."""
    if not texts:
        return None
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    pool = [texts[i] for i in order[: cfg.retain_pool]]
    batches = [
        tokenize_texts(pool[i : i + cfg.batch_size], tokenizer, max_length)
        for i in range(0, len(pool), cfg.batch_size)
    ]
    masks = [content_mask(ids, attn, tokenizer.bos_token_id) for ids, attn in batches]
    keep_states = cfg.retain_weight > 0 and cfg.retain_loss == "hidden"
    keep_similarity = cfg.retain_similarity_weight > 0
    if not (keep_states or keep_similarity):
        return RetainSet(batches, masks)
    if model is None or layer is None:
        raise ValueError("the retain terms need the model and the hook layer to take their references")
    if keep_similarity and (predictor is None or concept_vectors is None):
        raise ValueError("retain_similarity_weight needs the predictor and the concept vectors to take references")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    reference, similarity = [], []
    if keep_similarity:  # a copy: the caller's predictor stays where it is, in the mode it is in
        predictor = copy.deepcopy(predictor).to(device).eval()
        concept_vectors = concept_vectors.to(device)
    with torch.no_grad():
        for ids, attn in batches:
            ids, attn = ids.to(device), attn.to(device)
            h = hidden_at(model, ids, attn, layer)  # (B, T, H)
            if keep_states:
                reference.append(h.cpu())
            if keep_similarity:
                sim = concept_similarity(predictor(h, attn), concept_vectors)  # (B, T, C)
                similarity.append(sim.cpu())
    model.train(was_training)
    return RetainSet(batches, masks, reference if keep_states else None, similarity if keep_similarity else None)


def retain_terms(
    model, predictor, concept_vectors: torch.Tensor, retain: RetainSet, step: int, layer: int, cfg: UnlearnConfig
) -> dict[str, torch.Tensor]:
    """The unweighted retain losses of one step, on the step's retain batch: ``retain_loss`` (when
    ``cfg.retain_weight`` > 0) and ``retain_similarity_loss`` (when ``cfg.retain_similarity_weight`` > 0)."""
    device = next(model.parameters()).device
    i = retain.pick(step)
    ids, attn = (t.to(device) for t in retain.batches[i])
    mask = retain.masks[i].to(device)
    out: dict[str, torch.Tensor] = {}
    hidden = None
    if cfg.retain_weight > 0 and cfg.retain_loss == "lm":
        out["retain_loss"] = lm_loss(model, ids, attn)
    elif cfg.retain_weight > 0:
        if retain.reference is None:
            raise ValueError("retain_loss 'hidden' needs reference states: build the RetainSet with the model")
        hidden = by_length(lambda i, a: hidden_at(model, i, a, layer), ids, attn)  # (B, T, H)
        out["retain_loss"] = state_drift_loss(hidden, retain.reference[i].to(device), mask)
    if cfg.retain_similarity_weight > 0:
        if retain.similarity is None:
            raise ValueError("retain_similarity_weight needs cosines: pass build_retain_set the predictor")
        hidden = hidden if hidden is not None else hidden_at(model, ids, attn, layer)
        sim = concept_similarity(predictor(hidden, attn), concept_vectors)  # (B, T, C)
        out["retain_similarity_loss"] = similarity_drift_loss(
            sim, retain.similarity[i].to(device), mask, cfg.retain_similarity_margin
        )
    return out


def weighted_retain(terms: dict[str, torch.Tensor], cfg: UnlearnConfig) -> torch.Tensor:
    """The retain terms of `retain_terms`, each times its weight, summed."""
    weights = {"retain_loss": cfg.retain_weight, "retain_similarity_loss": cfg.retain_similarity_weight}
    return sum(weights[k] * v for k, v in terms.items())


# ------------------------------------------------------------------------------------------- one stage


def make_optimizer(params: list[torch.nn.Parameter], cfg: UnlearnConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    return torch.optim.Adam(params, lr=cfg.lr)


def _next_pick(order: list[int], rng: random.Random, n_batches: int, dist: Dist) -> int:
    """This process's batch for the next step: each step takes ``dist.world`` batches off ``order`` (refilled with a
    new shuffle of every batch when it runs out), one per process."""
    picks = []
    for _ in range(dist.world):
        if not order:
            order.extend(range(n_batches))
            rng.shuffle(order)
        picks.append(order.pop())
    return picks[dist.rank]


def _retain_similarity(model, predictor, retain: RetainSet, vectors: torch.Tensor, layer: int, autocast) -> dict:
    """The similarity stats of the first retain batch (what a logged step reports for the retain texts)."""
    device = vectors.device
    with torch.no_grad(), autocast:
        r_ids, r_attn = (t.to(device) for t in retain.batches[0])
        r_pred = predictor(hidden_at(model, r_ids, r_attn, layer), r_attn)
    return _similarity_stats(r_pred, vectors, retain.masks[0].to(device), "retain")


@dataclass
class StageInputs:
    """What one stage of unlearning trains on and pushes away from."""

    predictor: torch.nn.Module  # frozen during the stage
    layer: int  # the hook layer the predictor reads
    vectors: torch.Tensor  # (C, D) the concept vectors
    thresholds: torch.Tensor  # (C,) the stage's threshold per concept
    batches: list[ForgetBatch]
    retain: RetainSet | None = None  # the retain terms' texts; also where retain similarity is logged


def unlearn_stage(
    model, inputs: StageInputs, cfg: UnlearnConfig, params: list[torch.nn.Parameter], *, stage: int, on_log=None,
    progress: bool = True, dist: Dist = SINGLE,
) -> list[dict]:  # fmt: skip
    """``cfg.stage_steps`` optimizer steps of the unlearning loss; the predictor stays frozen. Steps are numbered
    from ``stage`` times that in the logged records (and in the retain batches they take).

    ``inputs.retain`` holds the retain texts: the optional retain term takes one of its batches a step, and its
    first batch is where similarity to the concepts on retain texts is logged. Returns the logged records.

    Across ``dist.world`` processes each step takes ``dist.world`` forget batches (the next ones of the same shuffled
    order, one per process) and averages the gradients; one process behaves exactly as without ``dist``.
    """
    batches, retain, layer = inputs.batches, inputs.retain, inputs.layer
    device = next(model.parameters()).device
    autocast = _autocast(cfg, device)
    opt = make_optimizer(params, cfg)
    predictor = inputs.predictor.to(device)  # a predictor trained or loaded on the CPU follows the model
    vectors = inputs.vectors.to(device)
    taus = inputs.thresholds.to(device)
    records: list[dict] = []
    model.train()
    rng = random.Random(cfg.seed + stage)
    order: list[int] = []
    n_steps = cfg.stage_steps(len(batches))
    step_offset = stage * n_steps
    desc = f"unlearning stage {stage} (tau {taus.max().item():.2f})"
    bar = tqdm(range(n_steps), desc=desc, disable=not progress, unit="step")
    for i in bar:
        b = batches[_next_pick(order, rng, len(batches), dist)]
        pick = (step_offset + i) * dist.world + dist.rank
        take_step = _relearn_aware_step if cfg.relearn_rho > 0 else _plain_step
        pred, mean_loss, retain_losses, grad_norm = take_step(model, opt, params, inputs, b, pick, cfg, dist)
        if i % cfg.log_every == 0 or i == n_steps - 1:
            rec = {"step": step_offset + i, "stage": stage, "loss": mean_loss, "grad_norm": grad_norm.item()}
            rec.update(_similarity_stats(pred.detach(), vectors, b.position_mask.to(device), "forget"))
            rec.update(_retain_stats(model, predictor, vectors, layer, retain_losses, retain, autocast))
            records.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if on_log is not None:
                on_log(rec)
    model.eval()
    return records


def _optimizer_step(opt, params: list[torch.nn.Parameter], total, cfg: UnlearnConfig, *, skip: bool, dist: Dist):
    """Backpropagate ``total``, average the gradients over the processes, clip and step; returns the gradient norm.

    A zero hinge (no window above its threshold; most late steps of a stage) has a zero gradient: plain SGD then
    changes nothing, so with ``skip`` (the hinge is zero and no retain term runs) the backward pass is skipped; with
    the retain term only its own graph is backpropagated. Adam keeps moving on its momentum, so it always steps."""
    opt.zero_grad(set_to_none=True)
    if skip and cfg.optimizer == "sgd":
        return torch.zeros(())
    total.backward()
    dist.mean_grads_(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return grad_norm


def _autocast(cfg: UnlearnConfig, device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")


def _hinge(model, inputs: StageInputs, b: ForgetBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions (B, T, D), the unlearning loss) of the frozen predictor on ``b`` at the model's weights now."""
    device = next(model.parameters()).device
    ids, attn = b.input_ids.to(device), b.attention_mask.to(device)
    pred = by_length(lambda i, a: inputs.predictor(hidden_at(model, i, a, inputs.layer), a), ids, attn)
    taus = inputs.thresholds.to(device)
    loss = unlearning_loss(
        pred, inputs.vectors.to(device), taus, b.position_mask.to(device), b.concept_mask.to(device)
    )
    return pred, loss


def _retain_losses(model, inputs: StageInputs, pick: int, cfg: UnlearnConfig) -> dict[str, torch.Tensor]:
    """`retain_terms` on retain batch ``pick``, or none when the stage has no retain texts or no retain weight."""
    if inputs.retain is None or not cfg.uses_retain:
        return {}
    vectors = inputs.vectors.to(next(model.parameters()).device)
    return retain_terms(model, inputs.predictor, vectors, inputs.retain, pick, inputs.layer, cfg)


def _plain_step(
    model, opt, params: list[torch.nn.Parameter], inputs: StageInputs, b: ForgetBatch, pick: int, cfg: UnlearnConfig,
    dist: Dist,
):  # fmt: skip
    """One step of the hinge (and the retain terms) at the weights as they are. Returns (predictions, the hinge's
    mean over the processes, retain losses, gradient norm)."""
    device = next(model.parameters()).device
    use_retain = inputs.retain is not None and cfg.uses_retain
    with _autocast(cfg, device):
        pred, loss = _hinge(model, inputs, b)
        total = loss
        retain_losses = _retain_losses(model, inputs, pick, cfg)
        if use_retain:
            total = total + weighted_retain(retain_losses, cfg)
    mean_loss = dist.sum(loss.item()) / dist.world  # over the processes: the same decision on every one
    if mean_loss == 0.0 and use_retain:
        total = weighted_retain(retain_losses, cfg)
    grad_norm = _optimizer_step(opt, params, total, cfg, skip=mean_loss == 0.0 and not use_retain, dist=dist)
    return pred.detach(), mean_loss, retain_losses, grad_norm


def attacker_step(grads: list[torch.Tensor | None], rho: float) -> list[torch.Tensor | None]:
    """Per parameter, where one relearning step moves it: ``-rho * sign(grad)`` of the next-token loss (the first step
    of Adam at learning rate ``rho``, which moves every weight by the rate whatever its gradient's size); None where
    the loss does not reach the parameter."""
    return [None if g is None else -rho * torch.sign(g) for g in grads]


def _relearn_aware_step(
    model, opt, params: list[torch.nn.Parameter], inputs: StageInputs, b: ForgetBatch, pick: int, cfg: UnlearnConfig,
    dist: Dist,
):  # fmt: skip
    """One step whose hinge is taken where relearning would take the weights: move the trained weights as
    ``cfg.relearn_steps`` relearning steps at rate ``cfg.relearn_rho`` on the batch's texts would, backpropagate the
    hinge there, move them back, add the retain terms' gradient at the weights as they are, and step. Only the trained
    weights move (the others cannot be hardened). Returns (predictions at the moved weights, the hinge there as a mean
    over the processes, retain losses, gradient norm)."""
    device = next(model.parameters()).device
    autocast = _autocast(cfg, device)
    ids, attn = b.input_ids.to(device), b.attention_mask.to(device)
    opt.zero_grad(set_to_none=True)
    kept = [p.detach().clone() for p in params]  # restored by copy: w + d - d is not always w
    try:
        for _ in range(cfg.relearn_steps):
            with autocast:
                nll = lm_loss(model, ids, attn)
            moves = attacker_step(torch.autograd.grad(nll, params, allow_unused=True), cfg.relearn_rho)
            with torch.no_grad():
                for p, d in zip(params, moves):
                    if d is not None:
                        p.add_(d)
        with autocast:
            pred, loss = _hinge(model, inputs, b)
        if loss.requires_grad and loss.item() > 0:
            loss.backward()  # before the weights move back: the graph saved them as they are now
    finally:
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)
    with autocast:
        retain_losses = _retain_losses(model, inputs, pick, cfg)
    if retain_losses:
        weighted_retain(retain_losses, cfg).backward()
    mean_loss = dist.sum(loss.item()) / dist.world
    if all(p.grad is None for p in params) and not dist.active:  # nothing to push or keep: SGD would not move
        return pred.detach(), mean_loss, retain_losses, torch.zeros(())
    dist.mean_grads_(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return pred.detach(), mean_loss, retain_losses, grad_norm


def _retain_stats(model, predictor, vectors, layer: int, retain_losses: dict, retain, autocast) -> dict:
    """What a logged step records of the retain side: its retain terms, and the predictor's similarity to the
    concepts on the first retain batch."""
    out = {k: v.item() for k, v in retain_losses.items()}
    if retain is not None:
        out.update(_retain_similarity(model, predictor, retain, vectors, layer, autocast))
    return out


def _similarity_stats(pred: torch.Tensor, vectors: torch.Tensor, mask: torch.Tensor, prefix: str) -> dict:
    sim = concept_similarity(pred.float(), vectors.float())[mask]  # (N, C)
    if sim.numel() == 0:
        return {}
    return {f"{prefix}_sim_mean": sim.mean(0).tolist(), f"{prefix}_sim_max": sim.max(0).values.tolist()}


def concept_window_texts(
    n_concepts: int,
    forget_texts: list[str],
    forget_concepts: list[list[int]],
    tokenizer,
    encoder,
    window: int,
    max_length: int,
) -> list[list[str]]:
    """Per concept row, the distinct window texts of its forget texts (what ``centroid`` targets average)."""
    from atu.windows import build_windows

    out = []
    for row in range(n_concepts):
        texts = [t for t, cs in zip(forget_texts, forget_concepts) if row in cs]
        out.append(
            build_windows(texts, tokenizer, encoder.tokenizer, window, max_length).window_texts if texts else []
        )
    return out


def target_vectors(
    concepts: ConceptSet,
    encoder,
    how: str,
    forget_window_texts: list[list[str]] | None = None,
    background: torch.Tensor | None = None,
) -> torch.Tensor:
    """(C, D) L2-normalised concept targets.

    ``name``: the encoder's embedding of the name (the paper). ``description``: of "name, description".
    ``centroid``: the mean embedding of the concept's forget windows. ``contrast``: that centroid minus
    ``background`` (the mean embedding of all alignment windows), which removes what every text of the corpus
    shares and keeps what is particular to the concept.
    """
    from atu.align import encode_texts

    if how == "name":
        return encode_texts(encoder, [c.name for c in concepts.concepts])
    if how == "description":
        missing = [c.name for c in concepts.concepts if not c.description]
        if missing:
            raise ConfigError(f"unlearn.target is 'description' but concept {missing[0]!r} has no description")
        return encode_texts(encoder, [f"{c.name}, {c.description}" for c in concepts.concepts])
    if forget_window_texts is None or any(not w for w in forget_window_texts):
        raise ConfigError(f"unlearn.target {how!r} needs forget texts with at least one full window per concept")
    centroids = torch.stack([encode_texts(encoder, w).mean(0) for w in forget_window_texts])  # (C, D)
    if how == "contrast":
        if background is None:
            raise ConfigError("unlearn.target 'contrast' needs the background mean of the alignment windows")
        centroids = centroids - background[None, :]
    return F.normalize(centroids, dim=-1)


def target_rows(
    concepts: ConceptSet,
    encoder,
    kinds: list[str],
    forget_window_texts: list[list[str]] | None = None,
    background: torch.Tensor | None = None,
) -> torch.Tensor:
    """(K * C, D) the targets of every kind for every concept, kind-major: row ``k * C + c`` is kind k of concept c
    (so the first C rows are the first kind's, one per concept)."""
    return torch.cat([target_vectors(concepts, encoder, k, forget_window_texts, background) for k in kinds])


def expand_rows(batches: list[ForgetBatch], n_kinds: int) -> list[ForgetBatch]:
    """The batches with each concept's mask column repeated for each of its ``n_kinds`` target rows (kind-major)."""
    if n_kinds == 1:
        return batches
    return [
        ForgetBatch(b.input_ids, b.attention_mask, b.position_mask, b.concept_mask.repeat(1, n_kinds)) for b in batches
    ]
