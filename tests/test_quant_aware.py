"""Quantization-aware unlearning: the model seen through the RTN quantizer computes what the quantized model
computes, trains its full-precision weights, and a schedule run with it on sees the quantized model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_llama

from atu.attack.quantize import QuantConfig, quantize_model
from atu.errors import ConfigError
from atu.quant_aware import quantized_view
from atu.unlearn import UnlearnConfig


def test_the_view_computes_what_the_quantized_model_computes_and_then_lets_go():
    model = random_llama()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        full = model(ids).logits
        quantized = quantize_model(model, QuantConfig(4, 16))(ids).logits
        with quantized_view(model, 4, 16):
            seen = model(ids).logits
        after = model(ids).logits
    assert torch.allclose(seen, quantized, atol=1e-5)
    assert not torch.allclose(seen, full, atol=1e-3)
    assert torch.equal(after, full)  # outside the block the model is as it was
    with quantized_view(model, None), torch.no_grad():
        assert torch.equal(model(ids).logits, full)  # off: nothing changes


def test_gradients_reach_the_full_precision_weights_through_the_quantizer():
    model = random_llama()
    ids = torch.randint(0, 64, (2, 6))
    with quantized_view(model, 4):
        model(ids, labels=ids).loss.backward()
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    # the straight-through gradient is the gradient at the quantized weights
    q = quantize_model(model, QuantConfig(4))
    q.zero_grad()
    q(ids, labels=ids).loss.backward()
    torch.testing.assert_close(w.grad, q.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5, rtol=1e-4)


def test_bad_quant_aware_settings_are_config_errors():
    with pytest.raises(ConfigError, match="bits"):
        UnlearnConfig(quant_aware_bits=3)
    with pytest.raises(ConfigError, match="group_size"):
        UnlearnConfig(quant_aware_bits=4, quant_aware_group_size=0)
    with pytest.raises(ConfigError, match="method full"):
        UnlearnConfig(quant_aware_bits=4, method="lora")
    assert UnlearnConfig(quant_aware_bits=8).quant_aware_group_size is None


@pytest.mark.slow
def test_a_quant_aware_run_measures_its_budget_on_the_quantized_model(tiny_world, tmp_path):
    from atu.run import run
    from atu.run_config import RunConfig

    def config(out, **unlearn):
        return RunConfig.from_dict({
            "model": "world:tiny", "data": {"forget": tiny_world.concepts().names()[:1]},
            "align": {"epochs": 3, "realign_epochs": 1, "window": 4},
            "unlearn": {"stages": 1, "extra_stages": 0, "steps_per_stage": 3, **unlearn}, "out": str(out),
        })  # fmt: skip

    def first_validation(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return next(r for r in map(json.loads, lines) if r.get("event") == "validated")

    # a rate too small to move the model: what the budget measures is then the model before, seen two ways
    plain = run(config(tmp_path / "plain", lr=1e-12), progress=False, export=False)
    aware = run(config(tmp_path / "q4", lr=1e-12, quant_aware_bits=4, quant_aware_group_size=16), progress=False,
                export=False)  # fmt: skip
    assert plain["stages"] and aware["stages"]
    fp32, int4 = first_validation(tmp_path / "plain"), first_validation(tmp_path / "q4")
    assert int4["val_ppl"] != pytest.approx(fp32["val_ppl"], rel=1e-3)  # the int4 model's perplexity ...
    assert int4["rise"] == pytest.approx(0.0, abs=1e-4)  # ... measured against the int4 model's before
