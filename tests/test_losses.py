"""Tests for atu.losses against naive Python-loop formulas, across dtypes, with masks and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from atu.losses import (
    alignment_loss,
    concept_similarity,
    cosine_to_targets,
    similarity_drift_loss,
    state_drift_loss,
    unlearning_loss,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# The functions compute in >= float32, and the references below use the same (already rounded) inputs in float64.
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-5}


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def naive_alignment(pred, target, mask) -> float:
    terms = [1.0 - _cos(pred[b][t], target[b][t]) for b in range(len(pred)) for t in range(len(pred[0])) if mask[b][t]]
    return sum(terms) / len(terms) if terms else 0.0


def naive_unlearning(pred, concepts, taus, mask, concept_mask) -> float:
    terms = []
    for b in range(len(pred)):
        applying = [c for c in range(len(concepts)) if concept_mask[b][c]]
        for t in range(len(pred[0])):
            if mask[b][t] and applying:
                hinge = [max(0.0, _cos(pred[b][t], concepts[c]) - taus[c]) for c in applying]
                terms.append(sum(hinge) / len(hinge))
    return sum(terms) / len(terms) if terms else 0.0


def _data(dtype, seed=0, batch=3, seq=5, dim=6, n_concepts=4):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(batch, seq, dim, generator=gen).to(dtype)
    target = torch.randn(batch, seq, dim, generator=gen).to(dtype)
    concepts = torch.randn(n_concepts, dim, generator=gen).to(dtype)
    mask = torch.rand(batch, seq, generator=gen) > 0.3
    return pred, target, concepts, mask


def _lists(x: torch.Tensor):
    return x.double().tolist()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_and_concept_similarity_match_naive(dtype):
    pred, target, concepts, _ = _data(dtype)
    cos = cosine_to_targets(pred, target)
    sim = concept_similarity(pred, concepts)
    assert cos.shape == pred.shape[:2] and sim.shape == (*pred.shape[:2], concepts.shape[0])
    assert cos.dtype == sim.dtype == torch.promote_types(dtype, torch.float32)
    p, g, c = _lists(pred), _lists(target), _lists(concepts)
    for b in range(pred.shape[0]):
        for t in range(pred.shape[1]):
            assert cos[b, t].item() == pytest.approx(_cos(p[b][t], g[b][t]), abs=ATOL[dtype])
            for k in range(len(c)):
                assert sim[b, t, k].item() == pytest.approx(_cos(p[b][t], c[k]), abs=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_alignment_loss_matches_naive(dtype):
    pred, target, _, mask = _data(dtype, seed=1)
    loss = alignment_loss(pred, target, mask)
    assert loss.ndim == 0 and loss.dtype == torch.promote_types(dtype, torch.float32)
    assert loss.item() == pytest.approx(naive_alignment(_lists(pred), _lists(target), mask.tolist()), abs=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_concept_mask", [False, True])
def test_unlearning_loss_matches_naive(dtype, with_concept_mask):
    pred, _, concepts, mask = _data(dtype, seed=2)
    taus = torch.tensor([0.1, -0.2, 0.3, 0.0])
    concept_mask = torch.tensor([[True, False, True, False], [False, False, False, False], [True, True, True, True]])
    loss = unlearning_loss(pred, concepts, taus, mask, concept_mask if with_concept_mask else None)
    assert loss.ndim == 0 and loss.dtype == torch.promote_types(dtype, torch.float32)
    cm = concept_mask.tolist() if with_concept_mask else [[True] * 4] * 3
    expected = naive_unlearning(_lists(pred), _lists(concepts), taus.tolist(), mask.tolist(), cm)
    assert expected > 0
    assert loss.item() == pytest.approx(expected, abs=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_flow_and_are_finite(dtype):
    pred, target, concepts, mask = _data(dtype, seed=3)
    pred.requires_grad_(True)
    loss = alignment_loss(pred, target, mask) + unlearning_loss(pred, concepts, torch.full((4,), -1.0), mask)
    loss.backward()
    assert pred.grad is not None and pred.grad.dtype == dtype
    assert torch.isfinite(pred.grad.float()).all() and pred.grad.abs().sum() > 0
    assert (pred.grad[~mask] == 0).all()  # masked-out positions get no gradient


def test_empty_mask_gives_zero_with_grad_path():
    pred, target, concepts, _ = _data(torch.float32, seed=4)
    pred.requires_grad_(True)
    empty = torch.zeros(pred.shape[:2], dtype=torch.bool)
    align = alignment_loss(pred, target, empty)
    unlearn = unlearning_loss(pred, concepts, torch.zeros(4), empty)
    assert align.item() == 0.0 and unlearn.item() == 0.0
    assert align.requires_grad and unlearn.requires_grad
    (align + unlearn).backward()
    assert (pred.grad == 0).all()


def test_no_applicable_concept_gives_zero():
    pred, _, concepts, mask = _data(torch.float32, seed=5)
    none = torch.zeros(pred.shape[0], concepts.shape[0], dtype=torch.bool)
    assert unlearning_loss(pred, concepts, torch.full((4,), -1.0), mask, none).item() == 0.0


def test_hinge_is_exactly_zero_below_threshold():
    pred, _, concepts, mask = _data(torch.float32, seed=6)
    pred.requires_grad_(True)
    taus = concept_similarity(pred, concepts).amax(dim=(0, 1)).detach() + 1e-3  # every cosine is below its tau
    loss = unlearning_loss(pred, concepts, taus, mask)
    assert loss.item() == 0.0
    loss.backward()
    assert (pred.grad == 0).all()


def test_zero_vectors_do_not_give_nan():
    pred = torch.zeros(1, 2, 4)
    assert torch.isfinite(cosine_to_targets(pred, torch.ones(1, 2, 4))).all()
    assert torch.isfinite(concept_similarity(pred, torch.zeros(3, 4))).all()


def test_bad_shapes_raise():
    pred, target, concepts, mask = _data(torch.float32)
    with pytest.raises(ValueError, match=r"pred must be a floating tensor of shape \(B, T, D\), got .*\(3, 5\)"):
        cosine_to_targets(pred[..., 0], target[..., 0])
    with pytest.raises(ValueError, match=r"target must have the shape of pred"):
        cosine_to_targets(pred, target[:, :2])
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(3, 5\), got torch.int64"):
        alignment_loss(pred, target, mask.long())
    with pytest.raises(ValueError, match=r"concepts must have shape \(C, 6\)"):
        concept_similarity(pred, concepts[:, :3])
    with pytest.raises(ValueError, match=r"thresholds must be a tensor of shape \(4,\)"):
        unlearning_loss(pred, concepts, torch.zeros(3), mask)
    with pytest.raises(ValueError, match=r"concept_mask must be a bool tensor of shape \(3, 4\)"):
        unlearning_loss(pred, concepts, torch.zeros(4), mask, torch.ones(3, 3, dtype=torch.bool))


def test_state_drift_loss_is_relative_and_masked():
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    assert state_drift_loss(ref.clone(), ref, mask).item() == 0.0
    # Moved to zero: moved exactly as far as the states are long.
    torch.testing.assert_close(state_drift_loss(torch.zeros_like(ref), ref, mask), torch.tensor(1.0))
    # Masked positions count for nothing, whatever they hold.
    moved = ref.clone()
    moved[1, 3:] += 100.0
    assert state_drift_loss(moved, ref, mask).item() == 0.0
    # Naive value on one changed position; scale-free: the same under a common rescaling.
    moved = ref.clone()
    moved[0, 1] += 1.0
    sizes = ref.pow(2).sum(-1)[mask]
    expected = (8.0 / mask.sum()) / sizes.mean()
    torch.testing.assert_close(state_drift_loss(moved, ref, mask), expected)
    torch.testing.assert_close(state_drift_loss(3 * moved, 3 * ref, mask), expected)


def test_state_drift_loss_gradient_reaches_only_hidden():
    ref = torch.randn(1, 4, 6, requires_grad=True)
    hidden = torch.randn(1, 4, 6, requires_grad=True)
    state_drift_loss(hidden, ref, torch.ones(1, 4, dtype=torch.bool)).backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert ref.grad is None
    with pytest.raises(ValueError, match="reference must have the shape"):
        state_drift_loss(hidden, torch.zeros(1, 4, 5), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool"):
        state_drift_loss(hidden, ref, torch.ones(1, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_similarity_drift_loss_matches_naive(dtype):
    gen = torch.Generator().manual_seed(3)
    sim = (torch.rand(2, 4, 3, generator=gen) * 2 - 1).to(dtype)
    ref = (torch.rand(2, 4, 3, generator=gen) * 2 - 1).to(dtype)
    mask = torch.tensor([[True, True, False, True], [False, True, True, False]])
    s, r = sim.double().tolist(), ref.double().tolist()
    terms = [
        sum((s[b][t][c] - r[b][t][c]) ** 2 for c in range(3)) / 3 for b in range(2) for t in range(4) if mask[b][t]
    ]
    got = similarity_drift_loss(sim, ref, mask)
    assert got.dtype in (torch.float32, torch.float64)
    assert got.item() == pytest.approx(sum(terms) / len(terms), abs=ATOL[dtype])
    assert similarity_drift_loss(ref, ref, mask).item() == 0.0


def test_similarity_drift_loss_masks_and_gradient():
    sim = torch.zeros(1, 3, 2, requires_grad=True)
    ref = torch.full((1, 3, 2), 0.5, requires_grad=True)
    mask = torch.tensor([[True, False, True]])
    loss = similarity_drift_loss(sim, ref, mask)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.25))
    assert ref.grad is None  # the reference is a constant
    assert sim.grad[0, 1].abs().sum() == 0 and sim.grad[0, 0].abs().sum() > 0  # a masked position gets no gradient
    empty = similarity_drift_loss(sim, ref, torch.zeros(1, 3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="reference must have the shape"):
        similarity_drift_loss(sim, torch.zeros(1, 3, 1), mask)
    with pytest.raises(ValueError, match=r"sim must be a floating tensor of shape \(B, T, C\)"):
        similarity_drift_loss(torch.zeros(3, 2), ref, mask)


def test_similarity_drift_loss_margin_is_a_dead_zone():
    ref = torch.zeros(1, 3, 1)
    sim = torch.tensor([0.05, -0.25, 0.5]).reshape(1, 3, 1)
    mask = torch.ones(1, 3, dtype=torch.bool)
    # Each position counts only what it moved beyond 0.1, either way: 0, 0.15, 0.4.
    expected = (0.0 + 0.15**2 + 0.4**2) / 3
    assert similarity_drift_loss(sim, ref, mask, margin=0.1).item() == pytest.approx(expected)
    assert similarity_drift_loss(sim, ref, mask, margin=0.6).item() == 0.0
    assert similarity_drift_loss(sim, ref, mask).item() == pytest.approx((0.05**2 + 0.25**2 + 0.5**2) / 3)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        similarity_drift_loss(sim, ref, mask, margin=-0.1)
