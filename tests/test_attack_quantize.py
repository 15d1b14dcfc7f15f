"""RTN quantization against hand-computed codes, the bucket-collapse check, and torch's int8 kernel path."""

from __future__ import annotations

import pytest
import torch
from conftest import random_llama
from torch import nn

from atu.attack.quantize import (
    QuantConfig,
    bucket_collapse,
    collapse_summary,
    fake_quantize,
    fake_quantize_ste,
    int8_dynamic,
    quantizable_linears,
    quantize_model,
    rtn_codes,
    weight_collapse,
)
from atu.errors import ConfigError

# Rows chosen so that no weight sits on a rounding tie.
W = torch.tensor(
    [
        [1.5, -3.5, 0.3, 2.2],  # int4 step 3.5 / 7 = 0.5: w / step = 3, -7, 0.6, 4.4
        [0.0, 0.0, 0.0, 0.0],  # all zero: step 1, codes 0
        [1.0, -0.7, 0.0, 0.45],  # int4 step 1 / 7: w / step = 7, -4.9, 0, 3.15
    ]
)


def test_int4_per_channel_matches_hand_computed_codes():
    codes, steps = rtn_codes(W, 4)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[3, -7, 1, 4], [0, 0, 0, 0], [7, -5, 0, 3]]
    assert torch.allclose(steps, torch.tensor([[0.5], [1.0], [1 / 7]]))
    expected = torch.tensor([[1.5, -3.5, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, -5 / 7, 0.0, 3 / 7]])
    assert torch.allclose(fake_quantize(W, 4), expected)


def test_int8_groups_of_two_match_hand_computed_codes():
    # Row 0, group 1: step 3.5 / 127, 1.5 / step = 54.43 -> 54; group 2: step 2.2 / 127, 0.3 / step = 17.32 -> 17.
    codes, steps = rtn_codes(W, 8, group_size=2)
    assert codes[0].tolist() == [54, -127, 17, 127]
    assert torch.allclose(steps[0], torch.tensor([3.5 / 127, 2.2 / 127]))
    assert torch.allclose(fake_quantize(W, 8, 2)[0], torch.tensor([54 * 3.5 / 127, -3.5, 17 * 2.2 / 127, 2.2]))


def test_quantization_error_is_at_most_half_a_step_and_keeps_dtype():
    w = torch.randn(8, 64, dtype=torch.float64)
    for bits, group in ((4, None), (4, 16), (8, None), (8, 32)):
        q = fake_quantize(w, bits, group)
        _, steps = rtn_codes(w, bits, group)
        step = steps.repeat_interleave(64 // steps.shape[1], dim=1)
        assert q.dtype == torch.float64
        assert ((q - w).abs() <= step / 2 + 1e-9).all()


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="bits must be one of"):
        QuantConfig(bits=3)
    with pytest.raises(ConfigError, match="group_size must be a positive int"):
        QuantConfig(bits=4, group_size=0)
    with pytest.raises(ConfigError, match="does not divide the weight's 4 input columns"):
        rtn_codes(W, 4, group_size=3)


def test_straight_through_estimator_passes_the_gradient_unchanged():
    w = torch.randn(4, 8, requires_grad=True)
    out = fake_quantize_ste(w, 4)
    assert torch.allclose(out, fake_quantize(w.detach(), 4))
    (out * torch.arange(32.0).reshape(4, 8)).sum().backward()
    assert torch.equal(w.grad, torch.arange(32.0).reshape(4, 8))


def _on_grid(rows=16, cols=32, seed=0) -> torch.Tensor:
    """int4 weights sitting exactly on their bucket centres: column 0 holds each row's largest magnitude (0.7, code 7,
    step 0.1); the others are codes in -5..5 times 0.1."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-5, 6, (rows, cols), generator=g).float() * 0.1
    w[:, 0] = 0.7
    return w


def test_an_update_smaller_than_a_bucket_collapses():
    w = _on_grid()
    update = torch.full_like(w, 0.03)  # 0.3 of a step, never past a rounding boundary from a bucket centre
    update[:, 0] = 0
    layer = weight_collapse("w", w, w + update, 4)
    assert layer.updated == 16 * 31
    assert layer.flipped == 0.0 and layer.survival == 0.0
    assert layer.update_in_steps == pytest.approx(0.3, abs=1e-4)
    assert layer.collapsed is True


def test_an_update_larger_than_a_bucket_does_not_collapse():
    w = _on_grid()
    sign = torch.where(torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    update = 0.15 * sign  # 1.5 steps: every changed weight lands one or two buckets away
    update[:, 0] = 0
    layer = weight_collapse("w", w, w + update, 4)
    assert layer.flipped == 1.0
    assert layer.survival > 0.5
    assert layer.collapsed is False


def test_a_rescaled_row_with_the_same_codes_still_collapses():
    w = _on_grid()
    update = torch.full_like(w, 0.03)
    update[:, 0] = 0.001  # the row maximum moves: every step grows by 0.14%, no weight changes bucket
    layer = weight_collapse("w", w, w + update, 4)
    assert layer.flipped == 0.0 and layer.collapsed is True
    assert 0 < layer.survival < 0.1  # the rescaling alone, small against the update


def test_int8_keeps_an_update_that_int4_loses():
    w = _on_grid()
    update = torch.full_like(w, 0.03)
    update[:, 0] = 0
    assert weight_collapse("w", w, w + update, 4).collapsed is True
    assert weight_collapse("w", w, w + update, 8).collapsed is False  # int8 step 0.7 / 127: 0.03 is 5 steps


class _Tiny(nn.Module):
    """Just enough of a causal LM for the decoder-layer lookup: model.layers, and a head outside them."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.model = nn.Module()
        linears = [nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights]
        self.model.layers = nn.ModuleList(nn.Sequential(lin) for lin in linears)
        with torch.no_grad():
            for block, w in zip(self.model.layers, weights):
                block[0].weight.copy_(w)
        self.lm_head = nn.Linear(4, 4)


def test_bucket_collapse_over_a_model_reports_each_layer():
    w0, w1 = _on_grid(seed=0), _on_grid(seed=1)
    small = torch.full_like(w0, 0.03)
    small[:, 0] = 0
    original = _Tiny([w0, w1])
    unlearned = _Tiny([w0 + small, w1])  # layer 1 untouched
    layers = bucket_collapse(original, unlearned, QuantConfig(4))
    assert [x.name for x in layers] == ["model.layers.0.0", "model.layers.1.0"]
    assert layers[0].collapsed is True
    assert layers[1].updated == 0 and layers[1].collapsed is None
    assert collapse_summary(layers) == {"layers_updated": 1, "layers_collapsed": 1, "flipped": 0.0}


def test_quantize_model_changes_decoder_linears_only_and_leaves_the_input_alone():
    torch.manual_seed(0)
    model = _Tiny([torch.randn(8, 16), torch.randn(8, 16)])
    before = {n: p.clone() for n, p in model.named_parameters()}
    q = quantize_model(model, QuantConfig(4, 8))
    assert [n for n, _ in quantizable_linears(model)] == ["model.layers.0.0", "model.layers.1.0"]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    qp = dict(q.named_parameters())
    assert torch.equal(qp["lm_head.weight"], before["lm_head.weight"])
    assert torch.equal(qp["model.layers.0.0.weight"], fake_quantize(before["model.layers.0.0.weight"], 4, 8))
    assert not torch.equal(qp["model.layers.0.0.weight"], before["model.layers.0.0.weight"])


def test_int8_dynamic_runs_torch_int8_kernels_close_to_full_precision():
    model = random_llama(0)
    q = int8_dynamic(model)
    assert type(q.model.layers[0].self_attn.q_proj).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert isinstance(q.lm_head, nn.Linear) and isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        full, quant = model(ids).logits, q(ids).logits
    assert not torch.equal(full, quant)
    assert (full - quant).abs().max() < 0.05 * full.abs().max()
