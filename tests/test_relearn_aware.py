"""Relearning-aware unlearning: the hinge is taken one attacker step away and applied to the weights as they are."""

from __future__ import annotations

import copy

import pytest
import torch

from atu.align import AlignConfig, new_predictor
from atu.errors import ConfigError
from atu.hidden import decoder_layers, freeze_above, hidden_at
from atu.losses import concept_similarity
from atu.texts import lm_loss
from atu.unlearn import StageInputs, UnlearnConfig, attacker_step, forget_batches, target_vectors, unlearn_stage


def test_attacker_step_is_an_adam_first_step():
    grads = [torch.tensor([[0.5, -2.0], [0.0, 1e-9]]), None]
    moves = attacker_step(grads, 0.1)
    torch.testing.assert_close(moves[0], torch.tensor([[-0.1, 0.1], [0.0, -0.1]]))
    assert moves[1] is None


def test_bad_relearn_rho_is_a_config_error():
    for bad in (-0.1, True, "0.1"):
        with pytest.raises(ConfigError, match="relearn_rho"):
            UnlearnConfig(relearn_rho=bad)
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="relearn_steps"):
            UnlearnConfig(relearn_rho=1e-3, relearn_steps=bad)
    with pytest.raises(ConfigError, match="algorithm atu"):
        UnlearnConfig(relearn_rho=1e-3, algorithm="gd")
    assert UnlearnConfig().relearn_rho == 0.0  # off by default


def _inputs(tiny_lm, tiny_world, encoder):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    concepts = tiny_world.concepts().subset(tiny_world.concepts().names()[:1])
    texts = [r.text for r in tiny_world.corpus() if r.concept == concepts.names()[0]]
    vectors = target_vectors(concepts, encoder, "name")
    torch.manual_seed(0)
    predictor = new_predictor(AlignConfig(), model.config.hidden_size, vectors.shape[1]).eval().requires_grad_(False)
    params = freeze_above(model, 1)
    batches = forget_batches(texts, [[0]] * len(texts), 1, tok, 128, 64, 0)  # one batch: every text
    return model, predictor, vectors, params, batches


def _top_cosine(model, predictor, vectors, batch) -> float:
    with torch.no_grad():
        pred = predictor(hidden_at(model, batch.input_ids, batch.attention_mask, 1), batch.attention_mask)
        return float(concept_similarity(pred, vectors)[batch.position_mask].max())


def test_the_hinge_is_read_one_attacker_step_away(tiny_lm, tiny_world, encoder):
    """With the threshold between the top cosine at the weights and at the weights one attacker step away, exactly
    one of the plain and the relearning-aware stage has something to push: the one that reads the side over it."""
    model, predictor, vectors, params, batches = _inputs(tiny_lm, tiny_world, encoder)
    b, rho = batches[0], 0.05
    top_here = _top_cosine(model, predictor, vectors, b)
    moved = copy.deepcopy(model)
    moved_params = [p for p in moved.parameters() if p.requires_grad]
    grads = torch.autograd.grad(lm_loss(moved, b.input_ids, b.attention_mask), moved_params, allow_unused=True)
    with torch.no_grad():
        for p, d in zip(moved_params, attacker_step(grads, rho)):
            if d is not None:
                p.add_(d)
    top_away = _top_cosine(moved, predictor, vectors, b)
    assert abs(top_away - top_here) > 1e-3  # the attacker step moves the states
    tau = torch.tensor([(top_here + top_away) / 2])
    upper = [p.detach().clone() for p in decoder_layers(model)[1].parameters()]
    moves = {}
    for r in (0.0, rho):
        m = copy.deepcopy(model)
        ps = [p for p in m.parameters() if p.requires_grad]
        cfg = UnlearnConfig(taus=[float(tau)], steps_per_stage=1, lr=0.3, log_every=1, relearn_rho=r)
        unlearn_stage(m, StageInputs(predictor, 1, vectors, tau, batches), cfg, ps, stage=0, progress=False)
        moves[r] = any(not torch.equal(a, c) for a, c in zip(params, ps))
        assert all(torch.equal(a, c) for a, c in zip(upper, decoder_layers(m)[1].parameters()))
    assert moves[0.0] == (top_here > top_away)
    assert moves[rho] == (top_away > top_here)


def test_weights_come_back_exactly_when_there_is_nothing_to_push(tiny_lm, tiny_world, encoder):
    model, predictor, vectors, params, batches = _inputs(tiny_lm, tiny_world, encoder)
    before = [p.detach().clone() for p in params]
    cfg = UnlearnConfig(taus=[1.0], steps_per_stage=2, log_every=1, relearn_rho=0.01, relearn_steps=3)
    records = unlearn_stage(
        model, StageInputs(predictor, 1, vectors, torch.tensor([1.0]), batches), cfg, params, stage=0, progress=False
    )
    assert all(r["loss"] == 0.0 for r in records)
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # moved and moved back, bit for bit
