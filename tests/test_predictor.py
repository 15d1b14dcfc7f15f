"""Tests for atu.predictor: causality, input normalisation, save/load, config validation, one training step."""

from __future__ import annotations

import json

import pytest
import torch

from atu.losses import alignment_loss
from atu.predictor import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    EmbeddingPredictor,
    PredictorConfig,
    load_predictor,
    save_predictor,
)

pytestmark = pytest.mark.usefixtures("one_thread")

IN, OUT = 16, 8


def _config(**overrides) -> PredictorConfig:
    args = {"input_dim": IN, "output_dim": OUT, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_len": 64}
    return PredictorConfig(**{**args, **overrides})


@pytest.fixture
def model() -> EmbeddingPredictor:
    torch.manual_seed(0)
    return EmbeddingPredictor(_config()).eval()


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])  # eval + no_grad takes the fused path
def test_strictly_causal(model, grad):
    torch.manual_seed(1)
    seq = 12
    hidden = torch.randn(2, seq, IN)
    with torch.set_grad_enabled(grad):
        base = model(hidden)
        for t in range(seq - 1):
            changed = hidden.clone()
            changed[:, t + 1 :] = torch.randn(2, seq - t - 1, IN) * 5
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])  # the change did reach the later outputs


def test_right_padding_does_not_change_real_positions(model):
    torch.manual_seed(2)
    hidden = torch.randn(2, 10, IN)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0
    with torch.no_grad():
        padded = model(hidden, mask)
        alone = model(hidden[:1, :6])
    torch.testing.assert_close(padded[0, :6], alone[0], atol=1e-6, rtol=0)
    assert (padded[0, 6:] == 0).all()


def test_scale_invariant_input(model):
    torch.manual_seed(3)
    hidden = torch.randn(3, 7, IN) * 40
    with torch.no_grad():
        out = model(hidden)
        torch.testing.assert_close(model(hidden / hidden.norm(dim=-1, keepdim=True)), out, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(3.7 * hidden), out, atol=1e-5, rtol=0)
        assert model(hidden.to(torch.bfloat16)).dtype == torch.float32


def test_forward_rejects_bad_input(model):
    with pytest.raises(ValueError, match=rf"hidden must have shape \(B, T, {IN}\).*got \(1, 4, 5\)"):
        model(torch.randn(1, 4, 5))
    with pytest.raises(ValueError, match="Sequence length 65 exceeds the predictor's max_len 64"):
        model(torch.randn(1, 65, IN))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, 4\)"):
        model(torch.randn(1, 4, IN), torch.ones(1, 5))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(4)
    config = _config(d_model=24, n_layers=1, n_heads=3, ffn_mult=2, max_len=20)  # not the defaults
    original = EmbeddingPredictor(config).eval()
    save_predictor(original, tmp_path / "guard")
    meta_text = (tmp_path / "guard" / CONFIG_NAME).read_text()
    meta = json.loads(meta_text)
    assert meta["format_version"] == 1 and meta["config"] == config.to_dict()
    assert meta_text == json.dumps(meta, sort_keys=True, indent=2) + "\n"
    assert sorted(p.name for p in (tmp_path / "guard").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    loaded = load_predictor(tmp_path / "guard")
    assert loaded.config == config and not loaded.training
    hidden = torch.randn(2, 9, IN)
    with torch.no_grad():
        assert torch.equal(loaded(hidden), original(hidden))


def test_load_truncated_weights_names_the_file(tmp_path, model):
    save_predictor(model, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: cannot read the predictor weights"):
        load_predictor(tmp_path)


def test_load_missing_or_corrupt_config_names_the_file(tmp_path, model):
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: cannot read the predictor config"):
        load_predictor(tmp_path)
    save_predictor(model, tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: cannot read the predictor config"):
        load_predictor(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format_version": 2, "config": model.config.to_dict()}))
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: format_version must be 1, got 2"):
        load_predictor(tmp_path)


def test_load_mismatched_shapes_names_the_file(tmp_path, model):
    save_predictor(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["config"]["d_model"] = 64
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: weights do not match the config"):
        load_predictor(tmp_path)
    meta["config"]["bogus"] = 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: invalid config: predictor config: unknown key 'bogus'"):
        load_predictor(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, r"d_model \(30\) must be divisible by n_heads \(4\)"),
        ({"input_dim": 0}, r"input_dim must be a positive int, got 0"),
        ({"n_layers": -1}, r"n_layers must be a positive int, got -1"),
        ({"max_len": 8.0}, r"max_len must be a positive int, got 8.0"),
        ({"dropout": 1.0}, r"dropout must be a float in \[0, 1\), got 1.0"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_config_dict_round_trip_and_rejects_unknown_keys():
    config = _config(dropout=0.1)
    assert PredictorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"predictor config: unknown key 'n_layer'"):
        PredictorConfig.from_dict({"input_dim": 4, "output_dim": 4, "n_layer": 2})
    with pytest.raises(ValueError, match=r"missing required keys \['output_dim'\]"):
        PredictorConfig.from_dict({"input_dim": 4})


def test_adam_steps_lower_alignment_loss():
    torch.manual_seed(5)
    model = EmbeddingPredictor(_config()).train()
    # Toy target: a fixed linear map of the current and the previous token's (normalised) hidden state.
    hidden = torch.randn(8, 12, IN)
    unit = hidden / hidden.norm(dim=-1, keepdim=True)
    mixed = unit + torch.roll(unit, shifts=1, dims=1)
    target = mixed @ torch.randn(IN, OUT)
    mask = torch.ones(8, 12, dtype=torch.bool)
    mask[:, 0] = False
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(30):
        loss = alignment_loss(model(hidden), target, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if len(losses) == 1:
            assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert losses[-1] < 0.5 * losses[0], losses
