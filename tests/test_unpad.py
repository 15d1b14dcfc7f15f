"""Batches run as groups of similar length: the grouping against brute force, and a causal LM's outputs and gradients
against the whole padded batch's."""

import itertools
import random

import pytest
import torch

from atu.hidden import hidden_at
from atu.predictor import EmbeddingPredictor, PredictorConfig
from atu.texts import lm_loss, token_logprobs
from atu.unpad import by_length, is_right_padded, length_groups, whole_batches
from tests.conftest import random_llama


def _cost(lengths, groups, call_cost):
    return sum(len(g) * max(lengths[i] for i in g) + call_cost for g in groups)


def _brute_force(lengths, call_cost):
    """The cheapest cost over every way to cut the rows, sorted by length, into contiguous runs."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = None
    for cuts in itertools.product((False, True), repeat=len(order) - 1):
        groups, start = [], 0
        for k, cut in enumerate(cuts, start=1):
            if cut:
                groups.append(order[start:k])
                start = k
        groups.append(order[start:])
        cost = _cost(lengths, groups, call_cost)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_length_groups_is_the_cheapest_cut(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(2, 20), rng.randint(60, 100)]) for _ in range(rng.randint(1, 9))]
    call_cost = rng.choice([0, 8, 32, 200])
    groups = length_groups(lengths, call_cost)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row once
    assert _cost(lengths, groups, call_cost) == _brute_force(lengths, call_cost)


def test_length_groups_by_hand():
    # Two short rows and two long ones: one call costs 4 * 90 = 360 positions, two cost 2 * 10 + 2 * 90 + 32 more.
    assert length_groups([90, 10, 88, 9], call_cost=32) == [[3, 1], [2, 0]]
    assert length_groups([90, 10, 88, 9], call_cost=1000) == [[3, 1, 2, 0]]
    assert length_groups([], call_cost=32) == []
    with pytest.raises(ValueError, match=">= 0"):
        length_groups([3, -1])


def test_is_right_padded():
    assert is_right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert not is_right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))


def _batch(lengths, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    attn = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(attn == 0, 0), attn


def test_lm_outputs_and_gradients_match_the_padded_batch():
    model = random_llama(0)
    ids, attn = _batch([30, 4, 5, 28, 3, 31, 6, 2])
    assert length_groups(attn.sum(1).tolist())[0] == [7, 4, 1, 2, 6]  # the short rows: one group, 6 wide

    def run(fn, whole):
        model.zero_grad()
        if whole:
            with whole_batches():
                out = fn(model, ids, attn)
        else:
            out = fn(model, ids, attn)
        (out**2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    def logits(m, i, a):
        return by_length(lambda i, a: m(input_ids=i, attention_mask=a, use_cache=False).logits, i, a)

    real = attn.bool()
    padded, _ = run(logits, whole=True)
    grouped, _ = run(logits, whole=False)
    assert torch.allclose(grouped[real], padded[real], atol=1e-5)
    assert (grouped[[7, 4, 1, 2, 6], 6:] == 0).all()  # past a group's width: zeros, masked out by every loss
    whole_logp, whole_grads = run(token_logprobs, whole=True)
    logp, grads = run(token_logprobs, whole=False)
    assert logp.shape == (8, 30) and torch.allclose(logp, whole_logp, atol=1e-5)
    assert (logp[attn[:, 1:] == 0] == 0).all() and (logp[attn[:, 1:] == 1] < 0).all()
    for name, grad in whole_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), name
    by_hand = torch.nn.functional.cross_entropy(
        padded[:, :-1].reshape(-1, 64), ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100).reshape(-1), ignore_index=-100
    )
    assert lm_loss(model, ids, attn).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_hidden_states_and_predictor_match_the_padded_batch():
    model = random_llama(1)
    predictor = EmbeddingPredictor(PredictorConfig(input_dim=32, output_dim=16, d_model=16, n_layers=1, n_heads=2))
    ids, attn = _batch([3, 25, 2, 24, 4, 26], seed=1)

    def run(i, a):
        return predictor(hidden_at(model, i, a, 1), a)

    real = attn.bool()
    assert torch.allclose(by_length(run, ids, attn)[real], run(ids, attn)[real], atol=1e-5)


def test_one_group_or_left_padding_goes_whole():
    calls = []

    def fn(i, a):
        calls.append(tuple(i.shape))
        return i.float()[..., None]

    ids, attn = _batch([5, 5, 4])
    by_length(fn, ids, attn)
    left = attn.flip(1)
    by_length(fn, ids, left)
    assert calls == [(3, 5), (3, 5)]  # lengths alike: one call; left padding: never cut
    calls.clear()
    ids, attn = _batch([30, 2, 3, 29])
    with whole_batches():
        by_length(fn, ids, attn)
    by_length(fn, ids, attn)
    assert calls == [(4, 30), (2, 3), (2, 30)]  # whole inside the block only
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        by_length(fn, ids, attn[:, :2])
