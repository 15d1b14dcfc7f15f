import copy
import math

import pytest
import torch

from atu.baselines import BaselineConfig, run_baseline
from atu.errors import ConfigError
from atu.hidden import decoder_layers
from atu.texts import next_token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def texts(tiny_world):
    corpus = tiny_world.corpus()
    first = tiny_world.concepts().names()[0]
    forget = [r.text for r in corpus if r.concept == first][:8]
    retain = [r.text for r in corpus if r.concept != first][:8]
    return forget, retain


def _run(tiny_lm, texts, **kw):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    layers = decoder_layers(model)
    upper = [p.detach().clone() for p in layers[1].parameters()]
    lower = [p.detach().clone() for p in layers[0].parameters()]
    cfg = BaselineConfig(**{"hook_layer": 1, "steps": 4, "lr": 1e-2, "batch_size": 8, "max_length": 64, **kw})
    model, records = run_baseline(model, tok, *texts, cfg, progress=False)
    return model, records, upper, lower


def test_next_token_logprobs_match_a_naive_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    ids = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    expected = torch.zeros(3)
    for b in range(3):
        for t in range(4):
            if mask[b, t + 1]:
                expected[b] += torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]]
    torch.testing.assert_close(next_token_logprobs(logits, ids, mask).sum(-1), expected)
    assert next_token_logprobs(logits, ids, mask)[2].abs().sum() == 0  # a one-token sequence predicts nothing
    with pytest.raises(ValueError, match="expected logits"):
        next_token_logprobs(logits[0], ids, mask)


@pytest.mark.parametrize("method", ["ga", "gd", "npo"])
def test_forget_nll_rises_and_only_lower_layers_change(tiny_lm, texts, method):
    model, records, upper, lower = _run(tiny_lm, texts, method=method)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["forget_nll"] > records[0]["forget_nll"]
    assert all("retain_nll" in r for r in records)
    if method == "gd":
        forget_rise = records[-1]["forget_nll"] - records[0]["forget_nll"]
        assert records[-1]["retain_nll"] - records[0]["retain_nll"] < forget_rise
    if method == "npo":
        assert records[0]["loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
    layers = decoder_layers(model)
    assert all(torch.equal(a, b) for a, b in zip(upper, layers[1].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(lower, layers[0].parameters()))
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_lora_budget_returns_plain_model_with_upper_layers_unchanged(tiny_lm, texts):
    model, records, upper, lower = _run(tiny_lm, texts, method="ga", method_budget="lora")
    assert type(model) is type(tiny_lm[0]) and not hasattr(model, "peft_config")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert records[-1]["forget_nll"] > records[0]["forget_nll"]
    layers = decoder_layers(model)
    assert all(torch.equal(a, b) for a, b in zip(upper, layers[1].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(lower, layers[0].parameters()))


def test_config_errors(tiny_lm, texts):
    with pytest.raises(ConfigError, match=r"baseline.method is 'rmu', expected one of \('ga', 'gd', 'npo'\)"):
        BaselineConfig(method="rmu", hook_layer=1)
    with pytest.raises(ConfigError, match="baseline.method_budget is 'half'"):
        BaselineConfig(method="ga", hook_layer=1, method_budget="half")
    with pytest.raises(ConfigError, match="hook_layer must be an integer >= 1"):
        BaselineConfig(method="ga", hook_layer=0)
    with pytest.raises(ConfigError, match="baseline.beta must be > 0"):
        BaselineConfig(method="npo", hook_layer=1, beta=0)
    with pytest.raises(ConfigError, match="unknown key 'epochs'"):
        BaselineConfig.from_dict({"method": "ga", "hook_layer": 1, "epochs": 3})
    assert BaselineConfig.from_dict({"method": "gd", "hook_layer": 2}).retain_weight == 1.0
    model, tok = tiny_lm
    forget, retain = texts
    with pytest.raises(ConfigError, match="no forget texts"):
        run_baseline(model, tok, [], retain, BaselineConfig(method="ga", hook_layer=1), progress=False)
    with pytest.raises(ConfigError, match="'gd' needs retain texts"):
        run_baseline(model, tok, forget, [], BaselineConfig(method="gd", hook_layer=1), progress=False)
    with pytest.raises(ConfigError, match=r"hook layer must be an integer in \[1, 2\]"):
        run_baseline(model, tok, forget, retain, BaselineConfig(method="ga", hook_layer=3), progress=False)


def test_on_step_sees_each_step_in_eval_mode_and_a_prefix_equals_a_shorter_run(tiny_lm, texts):
    """A benchmark scores several strengths from one run: the model handed over after k steps is the model a run of
    k steps returns, and the call (here: a forward pass in eval mode) does not change what follows."""
    model, tok = tiny_lm
    seen: dict[int, dict[str, torch.Tensor]] = {}
    modes = []

    def on_step(done, m):
        modes.append(m.training)
        with torch.no_grad():
            m(**tok(["A sentence the callback reads."], return_tensors="pt"))
        if done == 2:
            seen[done] = {n: p.detach().clone() for n, p in m.named_parameters()}

    cfg = BaselineConfig(method="npo", hook_layer=1, steps=4, lr=1e-2, batch_size=4, max_length=64)
    long_model, _ = run_baseline(copy.deepcopy(model), tok, *texts, cfg, progress=False, on_step=on_step)
    assert modes == [False] * 4
    short_cfg = BaselineConfig(**{**cfg.to_dict(), "steps": 2})
    short_model, _ = run_baseline(copy.deepcopy(model), tok, *texts, short_cfg, progress=False)
    for n, p in short_model.named_parameters():
        torch.testing.assert_close(seen[2][n], p.detach(), msg=n)
    plain, _ = run_baseline(copy.deepcopy(model), tok, *texts, cfg, progress=False)
    for (n, p), q in zip(long_model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    assert any(not torch.equal(seen[2][n], p) for n, p in long_model.named_parameters())
