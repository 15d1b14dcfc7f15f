import copy

import pytest
import torch

from atu.align import AlignConfig, new_predictor
from atu.errors import ConfigError
from atu.formats import Concept, ConceptSet
from atu.hidden import decoder_layers, freeze_above
from atu.unlearn import UnlearnConfig, forget_batches, lm_loss, target_vectors, unlearn_stage


def test_config_validation():
    with pytest.raises(ConfigError, match="must not rise"):
        UnlearnConfig(taus=[0.5, 0.9])
    with pytest.raises(ConfigError, match="unlearn.target is 'vibes'"):
        UnlearnConfig(target="vibes")
    with pytest.raises(ConfigError, match="unknown key 'tau'"):
        UnlearnConfig.from_dict({"tau": 0.5})


def test_concept_threshold_is_a_floor():
    cs = ConceptSet([Concept("A"), Concept("B", threshold=0.7)])
    cfg = UnlearnConfig(taus=[0.9, 0.5])
    torch.testing.assert_close(cfg.stage_thresholds(0.9, cs), torch.tensor([0.9, 0.9]))
    torch.testing.assert_close(cfg.final_thresholds(cs), torch.tensor([0.5, 0.7]))


def test_forget_batches_mask_bos_and_padding(tiny_lm):
    _, tok = tiny_lm
    batches = forget_batches(["a b c d e", "a"], [[0], [1]], 2, tok, 64, batch_size=2, seed=0)
    (b,) = batches
    assert b.position_mask.sum() == b.attention_mask.sum() - 2  # one BOS per text
    assert not b.position_mask[:, 0].any()
    assert b.concept_mask.sum() == 2 and b.concept_mask.shape == (2, 2)


def test_lm_loss_ignores_padding(tiny_lm):
    model, tok = tiny_lm
    ids = tok("Q: Where?\nA: there", return_tensors="pt").input_ids
    padded = torch.cat([ids, torch.full((1, 5), tok.pad_token_id)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(model, ids, torch.ones_like(ids)), lm_loss(model, padded, mask))


def _stage_inputs(tiny_lm, tiny_world, encoder):
    """A fresh copy of the tiny model (layer 0 trainable), a random frozen predictor, and one person's batches."""
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    concepts = tiny_world.concepts().subset(tiny_world.concepts().names()[:1])
    texts = [r.text for r in tiny_world.corpus() if r.concept == concepts.names()[0]]
    vectors = target_vectors(concepts, encoder, "name")
    predictor = new_predictor(AlignConfig(), model.config.hidden_size, vectors.shape[1]).eval().requires_grad_(False)
    params = freeze_above(model, 1)
    batches = forget_batches(texts, [[0]] * len(texts), 1, tok, 128, 8, 0)
    return model, predictor, vectors, params, batches


def test_stage_lowers_similarity_and_touches_only_lower_layers(tiny_lm, tiny_world, encoder):
    model, predictor, vectors, params, batches = _stage_inputs(tiny_lm, tiny_world, encoder)
    upper = [p.detach().clone() for p in decoder_layers(model)[1].parameters()]
    lower = [p.detach().clone() for p in params]
    cfg = UnlearnConfig(taus=[-1.0], steps_per_stage=15, lr=0.3, log_every=1)
    records = unlearn_stage(
        model, predictor, batches, vectors, torch.tensor([-1.0]), 1, cfg, params, stage=0, progress=False
    )
    assert records[-1]["forget_sim_mean"][0] < records[0]["forget_sim_mean"][0] - 0.05
    assert all(torch.equal(a, b) for a, b in zip(upper, decoder_layers(model)[1].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(lower, params))


def test_target_vectors(tiny_world, encoder):
    cs = tiny_world.concepts().subset(tiny_world.concepts().names()[:2])
    name = target_vectors(cs, encoder, "name")
    desc = target_vectors(cs, encoder, "description")
    cent = target_vectors(cs, encoder, "centroid", [["born in a city", "a novel"], ["a medal"]])
    background = target_vectors(cs, encoder, "centroid", [["born in a city", "a novel", "a medal"]] * 2)[0]
    contrast = target_vectors(cs, encoder, "contrast", [["born in a city", "a novel"], ["a medal"]], background)
    for v in (name, desc, cent, contrast):
        assert v.shape == (2, 384)
        torch.testing.assert_close(v.norm(dim=1), torch.ones(2))
    assert not torch.allclose(name, desc)
    # The contrast target is the centroid with the shared background direction taken out.
    cent0 = encoder.encode(["born in a city", "a novel"], convert_to_tensor=True, normalize_embeddings=True).mean(0)
    torch.testing.assert_close(contrast[0], torch.nn.functional.normalize(cent0.cpu() - background, dim=0))
    with pytest.raises(ConfigError, match="needs the background"):
        target_vectors(cs, encoder, "contrast", [["a"], ["b"]])
    with pytest.raises(ConfigError, match="has no description"):
        target_vectors(ConceptSet([Concept("X")]), encoder, "description")


def test_zero_hinge_changes_nothing(tiny_lm, tiny_world, encoder):
    model, predictor, vectors, params, batches = _stage_inputs(tiny_lm, tiny_world, encoder)
    before = [p.detach().clone() for p in params]
    cfg = UnlearnConfig(taus=[1.0], steps_per_stage=3, log_every=1)
    records = unlearn_stage(
        model, predictor, batches, vectors, torch.tensor([1.0]), 1, cfg, params, stage=0, progress=False
    )
    assert all(r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in records)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
