"""The method's losses as pure tensor functions.

Shapes: B batch, T positions, D embedding width, C concepts. Every function computes in at least float32
(bf16 and fp16 inputs are upcast; float64 stays float64) because cosines near a threshold are exactly where the
hinge switches on and off, and bf16 has three significant digits. Masks are bool tensors; a masked-out position
contributes nothing to a value or to a gradient, and an all-False mask gives a zero loss that still has a grad path
to ``pred`` (so a training step never needs a branch on it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Norms below this are treated as this, so a zero vector has cosine 0 with everything instead of NaN.
_EPS = 1e-8


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_pred(pred: torch.Tensor) -> None:
    if not isinstance(pred, torch.Tensor) or pred.ndim != 3 or not pred.is_floating_point():
        got = f"{pred.dtype} {tuple(pred.shape)}" if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(f"pred must be a floating tensor of shape (B, T, D), got {got}.")


def _check_mask(mask: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor of shape {shape}, got {got}; convert with `.bool()`.")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B, T) over ``mask`` (B, T); 0 with a grad path when the mask is empty."""
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)


def cosine_to_targets(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine between each predicted embedding and its target: (B, T, D), (B, T, D) -> (B, T)."""
    _check_pred(pred)
    if not isinstance(target, torch.Tensor) or target.shape != pred.shape:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must have the shape of pred {tuple(pred.shape)}, got {got}.")
    dtype = torch.promote_types(_upcast(pred).dtype, _upcast(target).dtype)
    return F.cosine_similarity(pred.to(dtype), target.to(dtype), dim=-1, eps=_EPS)


def alignment_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(pred_t, target_t)`` over positions where ``mask`` (B, T) is True; a scalar in [0, 2]."""
    cos = cosine_to_targets(pred, target)  # (B, T)
    _check_mask(mask, tuple(cos.shape), "mask")
    return _masked_mean(1.0 - cos, mask)


def concept_similarity(pred: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Cosine of every predicted embedding with every concept: (B, T, D), (C, D) -> (B, T, C)."""
    _check_pred(pred)
    if not isinstance(concepts, torch.Tensor) or concepts.ndim != 2 or concepts.shape[1] != pred.shape[-1]:
        got = tuple(concepts.shape) if isinstance(concepts, torch.Tensor) else type(concepts).__name__
        raise ValueError(f"concepts must have shape (C, {pred.shape[-1]}) to match pred's last dim, got {got}.")
    pred = _upcast(pred)
    pred_unit = pred / pred.norm(dim=-1, keepdim=True).clamp(min=_EPS)  # (B, T, D)
    concepts = _upcast(concepts).to(pred.dtype)
    concept_unit = concepts / concepts.norm(dim=-1, keepdim=True).clamp(min=_EPS)  # (C, D)
    return torch.einsum("btd,cd->btc", pred_unit, concept_unit)


def unlearning_loss(
    pred: torch.Tensor,
    concepts: torch.Tensor,
    thresholds: torch.Tensor,
    mask: torch.Tensor,
    concept_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinge that pushes predicted embeddings of forget texts below each concept's threshold.

    ``mean over masked (b, t) of [ mean over concepts c of example b of relu(cos(pred_bt, c) - tau_c) ]``

    Args:
        pred: (B, T, D) predictor outputs.
        concepts: (C, D) concept embeddings.
        thresholds: (C,) tau per concept.
        mask: (B, T) bool, positions to push (real tokens).
        concept_mask: (B, C) bool, which concepts each example is about; None means every concept applies to
            every example. Positions of an example with no concept are left out of the mean, so retain texts
            mixed into a batch do not dilute the loss.

    Returns:
        A scalar in at least float32; exactly 0 when every cosine is at or below its threshold.
    """
    sim = concept_similarity(pred, concepts)  # (B, T, C)
    batch, seq_len, n_concepts = sim.shape
    if not isinstance(thresholds, torch.Tensor) or tuple(thresholds.shape) != (n_concepts,):
        got = tuple(thresholds.shape) if isinstance(thresholds, torch.Tensor) else type(thresholds).__name__
        raise ValueError(f"thresholds must be a tensor of shape ({n_concepts},), one tau per concept, got {got}.")
    _check_mask(mask, (batch, seq_len), "mask")
    if concept_mask is None:
        concept_mask = torch.ones(batch, n_concepts, dtype=torch.bool, device=sim.device)
    _check_mask(concept_mask, (batch, n_concepts), "concept_mask")

    hinge = F.relu(sim - thresholds.to(device=sim.device, dtype=sim.dtype))  # (B, T, C)
    applies = concept_mask[:, None, :]  # (B, 1, C)
    zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
    per_position = torch.where(applies, hinge, zero).sum(-1)  # (B, T)
    n_applying = concept_mask.sum(-1)  # (B,)
    per_position = per_position / n_applying.clamp(min=1).to(sim.dtype)[:, None]
    return _masked_mean(per_position, mask & (n_applying > 0)[:, None])


def state_drift_loss(hidden: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How far hidden states moved from a reference, relative to the reference's size.

    ``mean_t ||h_t - h0_t||^2 / mean_t ||h0_t||^2`` over positions where ``mask`` (B, T) is True; 0 when nothing
    moved, 1 when the states moved as far as they are long. (B, T, H) inputs; the reference carries no gradient.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or not hidden.is_floating_point():
        got = f"{hidden.dtype} {tuple(hidden.shape)}" if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a floating tensor of shape (B, T, H), got {got}.")
    if not isinstance(reference, torch.Tensor) or reference.shape != hidden.shape:
        got = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
        raise ValueError(f"reference must have the shape of hidden {tuple(hidden.shape)}, got {got}.")
    _check_mask(mask, tuple(hidden.shape[:2]), "mask")
    hidden = _upcast(hidden)
    reference = _upcast(reference).detach().to(hidden.dtype)
    drift = (hidden - reference).pow(2).sum(-1)  # (B, T)
    scale = _masked_mean(reference.pow(2).sum(-1), mask).clamp(min=_EPS)
    return _masked_mean(drift, mask) / scale


def similarity_drift_loss(
    sim: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, margin: float = 0.0
) -> torch.Tensor:
    """How far the concept similarities of retain texts moved from where they were before unlearning, beyond a
    margin.

    ``mean over masked (b, t) and concepts c of relu(|sim_btc - ref_btc| - margin)^2``: 0 when no similarity moved
    by more than ``margin``. ``sim`` and ``reference`` are (B, T, C) cosines (from `concept_similarity`); the
    reference carries no gradient. Squared so that a drift just past the margin costs little and the term pulls
    back hardest where a retain position moved most.
    """
    for name, x in (("sim", sim), ("reference", reference)):
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating tensor of shape (B, T, C), got {got}.")
    if reference.shape != sim.shape:
        raise ValueError(f"reference must have the shape of sim {tuple(sim.shape)}, got {tuple(reference.shape)}.")
    _check_mask(mask, tuple(sim.shape[:2]), "mask")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}.")
    sim = _upcast(sim)
    reference = _upcast(reference).detach().to(device=sim.device, dtype=sim.dtype)
    excess = F.relu((sim - reference).abs() - margin)  # (B, T, C)
    return _masked_mean(excess.pow(2).mean(-1), mask)
