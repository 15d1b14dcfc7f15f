"""Round-to-nearest (RTN) weight quantization, the bucket-collapse check, and torch's CPU int8 kernels.

RTN, symmetric: each output channel (a row of a Linear weight of shape (out, in)), or each group of ``group_size``
consecutive input columns of a row, gets one step ``s = max|w| / qmax`` with ``qmax = 2**(bits-1) - 1``; a weight
becomes the integer code ``clamp(round(w / s), -qmax, qmax)`` and is served as ``code * s``. This is the RTN of
Zhang et al. ("Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025): an unlearning update smaller
than one step mostly leaves a weight in the bucket it was in, so the quantized unlearned model and the quantized
original share their codes, and the forgotten knowledge comes back.

Only the decoder layers' Linear weights are quantized; embeddings, norms and the LM head stay in full precision, as
GPTQ and AWQ checkpoints keep them (and the world model ties its head to its input embeddings).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from atu.errors import ConfigError
from atu.hidden import decoder_layers

BITS = (4, 8)
# A layer "collapses" when fewer than this share of the weights the unlearning changed land in another bucket than
# the original's: the quantized layer is then (nearly) the quantized original.
COLLAPSE_SHARE = 0.1


@dataclass
class QuantConfig:
    """One RTN setting."""

    bits: int = 4  # 4 or 8: codes in [-(2**(bits-1) - 1), 2**(bits-1) - 1]
    group_size: int | None = None  # None: one step per output channel; G: one per G input columns of a row

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"quantization bits must be one of {BITS}, got {self.bits!r}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ConfigError(f"quantization group_size must be a positive int or None (per channel), got {g!r}")

    @property
    def label(self) -> str:
        return f"int{self.bits} rtn " + (f"g{self.group_size}" if self.group_size else "per-channel")

    def to_dict(self) -> dict:
        return asdict(self)


def _groups(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) -> (out, n_groups, group): the blocks that share one step."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    g = in_f if group_size is None else group_size
    if in_f % g:
        raise ConfigError(f"group_size {g} does not divide the weight's {in_f} input columns; pick a divisor")
    return weight.reshape(out_f, in_f // g, g)


def rtn_codes(weight: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric RTN of ``weight`` (out, in): (integer codes (out, in) int8, steps (out, n_groups) float32).

    A block whose weights are all zero gets step 1 (its codes are 0 either way). Ties round half to even
    (``torch.round``)."""
    QuantConfig(bits, group_size)  # validates
    qmax = 2 ** (bits - 1) - 1
    blocks = _groups(weight.detach().float(), group_size)  # (out, n_groups, group)
    steps = blocks.abs().amax(-1) / qmax  # (out, n_groups)
    steps = torch.where(steps > 0, steps, torch.ones_like(steps))
    codes = torch.clamp(torch.round(blocks / steps[..., None]), -qmax, qmax)
    return codes.reshape(weight.shape).to(torch.int8), steps


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """The weight a RTN kernel computes with: ``code * step``, same shape and dtype as ``weight``."""
    codes, steps = rtn_codes(weight, bits, group_size)
    blocks = _groups(codes.float(), group_size) * steps[..., None]
    return blocks.reshape(weight.shape).to(weight.dtype)


def fake_quantize_ste(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """``fake_quantize`` in the forward pass, the identity in the backward pass (straight-through estimator): a
    training step can compute its loss on the quantized weights and still update the full-precision ones."""
    return weight + (fake_quantize(weight, bits, group_size) - weight).detach()


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear inside the decoder layers, in ``named_modules`` order."""
    inside = {id(m) for block in decoder_layers(model) for m in block.modules()}
    return [(n, m) for n, m in model.named_modules() if id(m) in inside and isinstance(m, nn.Linear)]


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """A copy of ``model`` whose decoder Linear weights are their RTN values (``model`` is left as it was)."""
    out = copy.deepcopy(model)
    for _, lin in quantizable_linears(out):
        lin.weight.copy_(fake_quantize(lin.weight, cfg.bits, cfg.group_size))
    return out


# ---------------------------------------------------------------------------------------------- bucket collapse


@dataclass
class LayerCollapse:
    """How much of one layer's unlearning update a RTN setting keeps."""

    name: str
    updated: int  # weights the unlearning changed
    flipped: float | None  # share of those whose integer code differs from the original's (another bucket)
    survival: float | None  # ||Q(W_u) - Q(W_o)|| / ||W_u - W_o|| (Frobenius): the update's size after quantization
    update_in_steps: float | None  # median |W_u - W_o| over the changed weights, in units of the original's step
    collapsed: bool | None  # flipped < COLLAPSE_SHARE; None for a layer the unlearning left alone

    def to_dict(self) -> dict:
        return asdict(self)


def weight_collapse(
    name: str, original: torch.Tensor, unlearned: torch.Tensor, bits: int, group_size: int | None = None
) -> LayerCollapse:
    """Compare RTN(unlearned) with RTN(original) for one weight (out, in) of both models."""
    if original.shape != unlearned.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(original.shape)} and {tuple(unlearned.shape)}")
    w_o, w_u = original.detach().float(), unlearned.detach().float()
    delta = w_u - w_o
    changed = delta != 0
    n = int(changed.sum())
    if n == 0:
        return LayerCollapse(name, 0, None, None, None, None)
    codes_o, steps = rtn_codes(w_o, bits, group_size)
    codes_u, _ = rtn_codes(w_u, bits, group_size)
    # Codes, not dequantized values: a changed row maximum rescales every weight of its block by a hair while
    # leaving each in its bucket, and that is still the quantized original.
    flipped = float((codes_u != codes_o)[changed].float().mean())
    per_weight_step = steps.repeat_interleave(w_o.shape[1] // steps.shape[1], dim=1)  # (out, in)
    in_steps = float((delta.abs() / per_weight_step)[changed].median())
    q_delta = fake_quantize(w_u, bits, group_size) - fake_quantize(w_o, bits, group_size)
    survival = float(q_delta.norm() / delta.norm())
    return LayerCollapse(name, n, flipped, survival, in_steps, flipped < COLLAPSE_SHARE)


def bucket_collapse(original: nn.Module, unlearned: nn.Module, cfg: QuantConfig) -> list[LayerCollapse]:
    """Per decoder Linear of two models of the same architecture: how much of the update survives ``cfg``."""
    a, b = quantizable_linears(original), quantizable_linears(unlearned)
    if [n for n, _ in a] != [n for n, _ in b]:
        raise ConfigError("the two models have different decoder Linear layers; compare the same architecture")
    return [weight_collapse(n, la.weight, lb.weight, cfg.bits, cfg.group_size) for (n, la), (_, lb) in zip(a, b)]


def collapse_summary(layers: list[LayerCollapse]) -> dict:
    """Totals over the layers the unlearning changed: how many collapse, and the update-weighted flipped share."""
    touched = [x for x in layers if x.updated]
    total = sum(x.updated for x in touched)
    return {
        "layers_updated": len(touched),
        "layers_collapsed": sum(bool(x.collapsed) for x in touched),
        "flipped": sum(x.flipped * x.updated for x in touched) / total if total else None,
    }


# ---------------------------------------------------------------------------------------------- a real int8 kernel


def int8_dynamic(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose decoder Linears run torch's CPU int8 kernels (``torch.ao`` dynamic quantization:
    int8 weights with one scale per output channel, activations quantized per batch at run time: W8A8, not the
    weight-only RTN above). Raises ConfigError where this torch build has no such kernel."""
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:
        raise ConfigError(f"this torch build has no torch.ao dynamic quantization ({e})") from None
    spec = {name: per_channel_dynamic_qconfig for name, _ in quantizable_linears(model)}
    try:
        with warnings.catch_warnings():  # torch 2.13 warns that torch.ao moves to torchao; it still works here
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            return quantize_dynamic(copy.deepcopy(model).float(), spec, inplace=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"torch's int8 dynamic quantization failed on this machine: {first}") from None
