"""Comparison baselines for unlearning: gradient ascent (ga), gradient difference (gd) and NPO.

They train the same parameters as ATU (decoder layers ``0..hook_layer-1``, fully or through LoRA) so that a
comparison differs only in the objective. They are comparison points, not products: no stopping rule, no schedule.

- ga: maximise the mean next-token NLL on forget texts.
- gd: ``-nll_forget + retain_weight * nll_retain``.
- npo (Zhang et al. 2024, "Negative Preference Optimization"): per forget sequence,
  ``-(2/beta) * logsigmoid(-beta * (logp_theta(seq) - logp_ref(seq)))``, averaged over the batch, where logp is
  the summed token log-likelihood and the reference is the model before the first step (read once per forget batch).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from atu.configs import dataclass_from_dict
from atu.errors import ConfigError
from atu.hidden import attach_lora, check_hook_layer, freeze_above
from atu.texts import token_logprobs, tokenize_texts
from atu.unlearn import make_optimizer

BASELINES = ("ga", "gd", "npo")
OPTIMIZERS = ("adam", "sgd")
BUDGETS = ("full", "lora")
LORA_RANK, LORA_ALPHA = 8, 16  # as ATU's defaults, so that a lora comparison has the same budget


@dataclass
class BaselineConfig:
    """One baseline run. ``hook_layer`` is the ATU hook layer: layers ``0..hook_layer-1`` are trained."""

    method: str  # ga | gd | npo
    hook_layer: int  # the same layers ATU trains: 0..hook_layer-1; the rest of the model stays frozen
    steps: int = 100  # optimizer steps
    lr: float = 1e-3  # constant learning rate
    optimizer: str = "adam"  # adam | sgd
    batch_size: int = 16  # texts per batch (forget and, for gd, retain)
    grad_clip: float = 1.0  # max global gradient norm
    retain_weight: float = 1.0  # gd only: weight of the retain NLL
    beta: float = 0.1  # npo only: inverse temperature of the preference loss
    method_budget: str = "full"  # full: fine-tune layers 0..hook_layer-1; lora: rank-8 adapters on them, merged
    max_length: int = 256  # tokens per text (truncated)
    seed: int = 0  # batch order and torch seed

    def __post_init__(self) -> None:
        for name, allowed in (("method", BASELINES), ("optimizer", OPTIMIZERS), ("method_budget", BUDGETS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"baseline.{name} is {getattr(self, name)!r}, expected one of {allowed}")
        if isinstance(self.hook_layer, bool) or not isinstance(self.hook_layer, int) or self.hook_layer < 1:
            raise ConfigError(
                f"baseline.hook_layer must be an integer >= 1 (ATU's hook layer), got {self.hook_layer!r}"
            )
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ConfigError(
                f"baseline.steps and baseline.batch_size must be >= 1 and baseline.max_length >= 2, "
                f"got {self.steps}, {self.batch_size}, {self.max_length}"
            )
        if not self.lr > 0 or not self.grad_clip > 0 or not self.beta > 0:
            raise ConfigError(
                f"baseline.lr, baseline.grad_clip and baseline.beta must be > 0, "
                f"got {self.lr}, {self.grad_clip}, {self.beta}"
            )
        if self.retain_weight < 0:
            raise ConfigError(f"baseline.retain_weight must be >= 0, got {self.retain_weight}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaselineConfig:
        return dataclass_from_dict(cls, data, "baseline")


def _logprob(model, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sequence summed log-prob (B,), number of predicted tokens) of one batch."""
    ids, attn = batch
    return token_logprobs(model, ids, attn).sum(-1), attn[:, 1:].sum().clamp(min=1)


@torch.no_grad()
def reference_logprobs(ref, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """NPO's reference: per forget batch, the (B,) summed log-likelihood of each sequence under ``ref``, the model
    before unlearning, on its device. The reference never changes, so it is read once here instead of a frozen copy
    of the model running at every step."""
    device = next(ref.parameters()).device
    was_training = ref.training
    ref.eval()
    out = [_logprob(ref, (ids.to(device), attn.to(device)))[0] for ids, attn in batches]
    ref.train(was_training)
    return out


def objective(model, ref_logp, forget_batch, retain_batch, cfg: BaselineConfig) -> tuple[torch.Tensor, dict]:
    """(loss, {"forget_nll", and "retain_nll" for gd}) of one step of ``cfg.method`` on one forget batch (and, for gd,
    one retain batch); ``ref_logp`` is the batch's `reference_logprobs` (npo)."""
    if cfg.method == "npo" and ref_logp is None:
        raise ValueError("npo needs the forget batch's reference log-likelihoods (reference_logprobs)")
    logp, n_tok = _logprob(model, forget_batch)
    rec = {"forget_nll": -logp.sum() / n_tok}
    if cfg.method == "ga":
        return -rec["forget_nll"], rec
    if cfg.method == "gd":
        r_logp, r_tok = _logprob(model, retain_batch)
        rec["retain_nll"] = -r_logp.sum() / r_tok
        return -rec["forget_nll"] + cfg.retain_weight * rec["retain_nll"], rec
    return -(2 / cfg.beta) * F.logsigmoid(-cfg.beta * (logp - ref_logp)).mean(), rec


def _batches(texts: list[str], tokenizer, cfg: BaselineConfig, seed: int, device) -> list[tuple]:
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    out = []
    for start in range(0, len(order), cfg.batch_size):
        ids, attn = tokenize_texts(
            [texts[i] for i in order[start : start + cfg.batch_size]], tokenizer, cfg.max_length
        )
        out.append((ids.to(device), attn.to(device)))
    return out


def _trainable(model, cfg: BaselineConfig):
    """(model, trainable params): ATU's budget, full layers or LoRA adapters on layers 0..hook_layer-1."""
    if cfg.method_budget == "full":
        return model, freeze_above(model, cfg.hook_layer)
    model = attach_lora(model, cfg.hook_layer, LORA_RANK, LORA_ALPHA)
    return model, [p for p in model.parameters() if p.requires_grad]


def run_baseline(
    model,
    tokenizer,
    forget_texts: list[str],
    retain_texts: list[str],
    cfg: BaselineConfig,
    *,
    progress: bool = True,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train ``model`` in place with ``cfg.method`` for ``cfg.steps`` steps; returns (model, one record per step).

    With the lora budget the returned model is the merged plain model. Records hold ``step``, ``loss``,
    ``forget_nll`` (mean token NLL of the step's forget batch, before the step) and ``retain_nll`` when retain
    texts are given. The parameters' ``requires_grad`` flags are restored afterwards.

    ``on_step(steps_done, model)`` is called after every step, with the model in eval mode (LoRA: not merged yet):
    a benchmark scores the model at several step counts from one run. It must not change the model.
    """
    if not forget_texts:
        raise ConfigError("no forget texts: a baseline needs texts about the concepts to forget")
    if cfg.method == "gd" and not retain_texts:
        raise ConfigError("baseline.method 'gd' needs retain texts; pass some or use method 'ga' or 'npo'")
    check_hook_layer(model, cfg.hook_layer)
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    forget = _batches(forget_texts, tokenizer, cfg, cfg.seed, device)
    ref = reference_logprobs(model, forget) if cfg.method == "npo" else None
    retain = _batches(retain_texts, tokenizer, cfg, cfg.seed + 1, device) if retain_texts else []
    model, params = _trainable(model, cfg)
    opt = make_optimizer(params, cfg)  # reads only cfg.optimizer and cfg.lr
    logged: list[dict[str, torch.Tensor]] = []
    model.train()
    for step in tqdm(range(cfg.steps), desc=f"baseline {cfg.method}", disable=not progress, unit="step"):
        # lr: constant (cfg.lr, set in the optimizer); forward and loss:
        i = step % len(forget)
        loss, rec = objective(
            model, ref[i] if ref else None, forget[i], retain[step % len(retain)] if retain else None, cfg
        )
        if retain and "retain_nll" not in rec:
            with torch.no_grad():
                r_logp, r_tok = _logprob(model, retain[step % len(retain)])
            rec["retain_nll"] = -r_logp.sum() / r_tok
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        # Keep tensors and convert them once at the end: no device sync per step.
        logged.append({"loss": loss.detach(), **{k: v.detach() for k, v in rec.items()}})
        if on_step is not None:
            model.eval()
            on_step(step + 1, model)
            model.train()
    model.eval()
    if cfg.method_budget == "lora":
        model = model.merge_and_unload()
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    return model, [{"step": i, **{k: float(v) for k, v in r.items()}} for i, r in enumerate(logged)]


def baseline_stage(
    model,
    params: list[torch.nn.Parameter],
    forget: list[tuple[torch.Tensor, torch.Tensor]],
    retain: list[tuple[torch.Tensor, torch.Tensor]],
    ref: list[torch.Tensor] | None,
    cfg: BaselineConfig,
    *,
    stage: int,
    progress: bool = True,
) -> list[dict]:
    """``cfg.steps`` optimizer steps of a baseline objective on ``params``, for a schedule that checks a retain budget
    between stages (as ATU's does). ``forget`` and ``retain`` are (input_ids, attention_mask) batches, cycled from
    where the stage's number puts them; ``ref`` holds each forget batch's `reference_logprobs` (npo). Returns one
    record per step: ``loss`` and ``forget_nll`` (before the step)."""
    if cfg.method == "gd" and not retain:
        raise ConfigError("unlearn.algorithm 'gd' needs retain texts (corpus texts about no forgotten concept)")
    if cfg.method == "npo" and ref is None:
        raise ValueError("npo needs the forget batches' reference log-likelihoods (reference_logprobs)")
    device = next(model.parameters()).device
    opt = make_optimizer(params, cfg)
    logged = []
    model.train()
    for i in tqdm(range(cfg.steps), desc=f"{cfg.method} stage {stage}", disable=not progress, unit="step"):
        step = stage * cfg.steps + i
        fb = tuple(t.to(device) for t in forget[step % len(forget)])
        rb = tuple(t.to(device) for t in retain[step % len(retain)]) if cfg.method == "gd" else None
        loss, rec = objective(model, ref[step % len(forget)] if ref is not None else None, fb, rb, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        logged.append({"loss": loss.detach(), "forget_nll": rec["forget_nll"].detach()})
    model.eval()
    return [{"step": stage * cfg.steps + i, **{k: float(v) for k, v in r.items()}} for i, r in enumerate(logged)]
