import copy

import pytest
import torch
from torch import nn

from atu.errors import ConfigError
from atu.hidden import decoder_layers, freeze_above, hidden_at


def _batch(tok):
    enc = tok(["Q: Where was it?\nA: here", "hello"], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def test_hidden_at_matches_full_forward(tiny_lm):
    model, tok = tiny_lm
    ids, attn = _batch(tok)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
        h1 = hidden_at(model, ids, attn, 1)
    torch.testing.assert_close(h1, full[1])


def test_truncated_forward_skips_upper_layers(tiny_lm):
    model, tok = tiny_lm
    ids, attn = _batch(tok)
    called = []
    handle = decoder_layers(model)[1].register_forward_hook(lambda *a: called.append(1))
    try:
        with torch.no_grad():
            hidden_at(model, ids, attn, 1)
    finally:
        handle.remove()
    assert called == []


def test_gradients_reach_only_layers_below_hook(tiny_lm):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    params = freeze_above(model, 1)
    layers = decoder_layers(model)
    assert {id(p) for p in params} == {id(p) for p in layers[0].parameters()}
    ids, attn = _batch(tok)
    hidden_at(model, ids, attn, 1).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[0].parameters() if p.dim() > 1)
    assert all(p.grad is None for p in layers[1].parameters())


@pytest.mark.parametrize("layer", [0, 3, -1, 1.5])
def test_bad_hook_layer(tiny_lm, layer):
    model, tok = tiny_lm
    ids, attn = _batch(tok)
    with pytest.raises(ConfigError, match=r"hook layer must be an integer in \[1, 2\]"):
        hidden_at(model, ids, attn, layer)


def test_unsupported_architecture():
    with pytest.raises(ConfigError, match="cannot find the decoder layers of Linear"):
        decoder_layers(nn.Linear(2, 2))


def _saved_bytes_and_grads(model, ids, attn, layer):
    """Bytes the forward keeps for the backward (outside any checkpoint), and the gradients of a loss on ``layer``."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = hidden_at(model, ids, attn, layer)
    h.pow(2).mean().backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(tiny_lm, method):
    from atu.schedule import make_trainable
    from atu.unlearn import UnlearnConfig

    model, tok = tiny_lm
    ids, attn = _batch(tok)
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        m, params = make_trainable(
            copy.deepcopy(model), 1, UnlearnConfig(method=method, gradient_checkpointing=checkpointing)
        )
        for name, p in params.items():  # LoRA's B starts at zero: give the adapters something to differentiate
            if "lora_B" in name:
                torch.nn.init.normal_(p)
        runs.append(_saved_bytes_and_grads(m, ids, attn, 1))
    (plain_bytes, plain), (ckpt_bytes, ckpt) = runs
    assert plain and plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name])
    assert any(g.abs().sum() > 0 for g in ckpt.values())
    assert ckpt_bytes < plain_bytes / 2


def test_reentrant_checkpointing_would_train_nothing(tiny_lm):
    """Why enable_checkpointing insists on non-reentrant: the truncated forward loses its graph otherwise."""
    model = copy.deepcopy(tiny_lm[0])
    freeze_above(model, 1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    assert not hidden_at(model, *_batch(tiny_lm[1]), 1).requires_grad
