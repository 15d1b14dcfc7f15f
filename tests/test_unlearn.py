import copy

import pytest
import torch

from atu.align import AlignConfig, new_predictor
from atu.errors import ConfigError
from atu.formats import Concept, ConceptSet
from atu.hidden import decoder_layers, freeze_above
from atu.texts import lm_loss
from atu.unlearn import (
    StageInputs,
    UnlearnConfig,
    expand_rows,
    forget_batches,
    target_rows,
    target_vectors,
    unlearn_stage,
)


def test_config_validation():
    with pytest.raises(ConfigError, match="must not rise"):
        UnlearnConfig(taus=[0.5, 0.9])
    with pytest.raises(ConfigError, match="unlearn.target is 'vibes'"):
        UnlearnConfig(target="vibes")
    with pytest.raises(ConfigError, match="unknown key 'tau'"):
        UnlearnConfig.from_dict({"tau": 0.5})


def test_target_kinds_and_stage_steps():
    cfg = UnlearnConfig(target="name+contrast", min_steps=40, stage_epochs=20)
    assert cfg.target_kinds == ["name", "contrast"] and cfg.placed
    assert cfg.stage_steps(1) == 40 and cfg.stage_steps(3) == 60  # 20 passes over 3 batches
    assert UnlearnConfig(steps_per_stage=7).stage_steps(100) == 7
    with pytest.raises(ConfigError, match="name\\+name"):
        UnlearnConfig(target="name+name")
    with pytest.raises(ConfigError, match="joined by"):
        UnlearnConfig(target="name+vibes")
    with pytest.raises(ValueError, match="placed schedule"):
        UnlearnConfig().final_thresholds(ConceptSet([Concept("A")]))


def test_target_rows_are_kind_major(encoder):
    cs = ConceptSet([Concept("Ada Brill", description="a poet"), Concept("Cor Dune", description="a judge")])
    rows = target_rows(cs, encoder, ["name", "description"])
    assert rows.shape[0] == 4
    torch.testing.assert_close(rows[:2], target_vectors(cs, encoder, "name"))
    torch.testing.assert_close(rows[2:], target_vectors(cs, encoder, "description"))


def test_expand_rows_repeats_each_concept_column_per_kind(tiny_lm):
    _, tok = tiny_lm
    (b,) = forget_batches(["a b", "c d"], [[0], [1]], 2, tok, 64, batch_size=2, seed=0)
    (e,) = expand_rows([b], 2)
    assert e.concept_mask.shape == (2, 4)
    torch.testing.assert_close(e.concept_mask[:, :2], b.concept_mask)
    torch.testing.assert_close(e.concept_mask[:, 2:], b.concept_mask)


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
        model, StageInputs(predictor, 1, vectors, torch.tensor([-1.0]), batches), cfg, params, stage=0, progress=False
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
        model, StageInputs(predictor, 1, vectors, torch.tensor([1.0]), batches), cfg, params, stage=0, progress=False
    )
    assert all(r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in records)
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_retain_set_reference_is_the_model_before_training(tiny_lm, tiny_world, encoder):
    from atu.hidden import hidden_at
    from atu.losses import concept_similarity
    from atu.unlearn import build_retain_set, retain_terms, weighted_retain

    model, tok = tiny_lm
    texts = [r.text for r in tiny_world.corpus()][:10]
    vectors = target_vectors(tiny_world.concepts().subset(tiny_world.concepts().names()[:2]), encoder, "name")
    predictor = new_predictor(AlignConfig(), model.config.hidden_size, vectors.shape[1]).train()
    cfg = UnlearnConfig(retain_weight=1.0, retain_similarity_weight=2.0, retain_pool=6, batch_size=4)
    rs = build_retain_set(texts, tok, 128, cfg, model, 1, predictor, vectors)
    assert predictor.training  # the caller's predictor is left in its mode
    assert [ids.shape[0] for ids, _ in rs.batches] == [4, 2]  # the pool is capped at 6 texts
    ids, attn = rs.batches[1]
    with torch.no_grad():
        torch.testing.assert_close(rs.reference[1], hidden_at(model, ids, attn, 1))
        sim = concept_similarity(predictor.eval()(hidden_at(model, ids, attn, 1), attn), vectors)
        torch.testing.assert_close(rs.similarity[1], sim)  # (B, T, C): one cosine per position and concept
        assert rs.similarity[1].shape[-1] == 2
        terms = retain_terms(model, predictor, vectors, rs, step=1, layer=1, cfg=cfg)
        assert set(terms) == {"retain_loss", "retain_similarity_loss"}
        assert all(v.item() == pytest.approx(0.0, abs=1e-10) for v in terms.values())  # nothing moved yet
        assert rs.pick(3) == 1
        lm_cfg = UnlearnConfig(retain_weight=1.0, retain_loss="lm")
        lm = retain_terms(model, predictor, vectors, rs, step=0, layer=1, cfg=lm_cfg)
        assert set(lm) == {"retain_loss"}
        torch.testing.assert_close(lm["retain_loss"], lm_loss(model, *rs.batches[0]))
        fake = {"retain_loss": torch.tensor(0.5), "retain_similarity_loss": torch.tensor(0.25)}
        assert weighted_retain(fake, cfg).item() == pytest.approx(1.0)
    assert build_retain_set([], tok, 128, cfg, model, 1) is None
    bare = build_retain_set(texts, tok, 128, UnlearnConfig(retain_weight=0.0), model, 1)
    assert bare.reference is None and bare.similarity is None  # weights 0: no references taken
    with pytest.raises(ValueError, match="predictor and the concept vectors"):
        build_retain_set(texts, tok, 128, UnlearnConfig(retain_similarity_weight=1.0), model, 1)
    with pytest.raises(ConfigError, match="retain_loss"):
        UnlearnConfig(retain_loss="kl")
    with pytest.raises(ConfigError, match="must be a number >= 0, got 1.0, -1.0, 0.0"):
        UnlearnConfig(retain_similarity_weight=-1.0)


def test_similarity_retain_term_keeps_retain_similarity_closer(tiny_lm, tiny_world, encoder):
    """The same stage with and without the similarity term: with it, the predictor's cosine to the concept on the
    retain texts moves less, while the forget texts' cosine still falls."""
    from atu.hidden import hidden_at
    from atu.losses import concept_similarity
    from atu.unlearn import build_retain_set

    names = tiny_world.concepts().names()
    retain_texts = [r.text for r in tiny_world.corpus() if r.concept != names[0]]
    shift, forget_drop = {}, {}
    for weight in (0.0, 10.0):
        model, predictor, vectors, params, batches = _stage_inputs(tiny_lm, tiny_world, encoder)
        cfg = UnlearnConfig(
            taus=[-1.0], steps_per_stage=10, lr=0.3, retain_weight=0.0, retain_similarity_weight=weight, log_every=9
        )
        _, tok = tiny_lm
        rs = build_retain_set(
            retain_texts, tok, 128, UnlearnConfig(retain_similarity_weight=1.0), model, 1, predictor, vectors
        )
        records = unlearn_stage(
            model, StageInputs(predictor, 1, vectors, torch.tensor([-1.0]), batches, rs), cfg, params, stage=0,
            progress=False,
        )  # fmt: skip
        assert ("retain_similarity_loss" in records[0]) == (weight > 0)
        assert "retain_loss" not in records[0]
        forget_drop[weight] = records[0]["forget_sim_mean"][0] - records[-1]["forget_sim_mean"][0]
        with torch.no_grad():
            moved = [
                (concept_similarity(predictor(hidden_at(model, ids, attn, 1), attn), vectors) - ref)[m].abs().mean()
                for (ids, attn), ref, m in zip(rs.batches, rs.similarity, rs.masks)
            ]
        shift[weight] = float(torch.stack(moved).mean())
    assert shift[10.0] < 0.5 * shift[0.0], shift
    assert forget_drop[10.0] > 0.02, forget_drop


def test_hidden_retain_term_keeps_retain_states_closer(tiny_lm, tiny_world, encoder):
    """The same stage with and without the retain term: with it, the retain texts' layer-L states move less."""
    from atu.losses import state_drift_loss
    from atu.unlearn import build_retain_set

    names = tiny_world.concepts().names()
    retain_texts = [r.text for r in tiny_world.corpus() if r.concept != names[0]]
    drift = {}
    for weight in (0.0, 10.0):
        model, predictor, vectors, params, batches = _stage_inputs(tiny_lm, tiny_world, encoder)
        cfg = UnlearnConfig(taus=[-1.0], steps_per_stage=10, lr=0.3, retain_weight=weight, log_every=5)
        _, tok = tiny_lm
        rs = build_retain_set(retain_texts, tok, 128, UnlearnConfig(retain_weight=1.0), model, 1)
        records = unlearn_stage(
            model, StageInputs(predictor, 1, vectors, torch.tensor([-1.0]), batches, rs), cfg, params, stage=0,
            progress=False,
        )  # fmt: skip
        assert ("retain_loss" in records[0]) == (weight > 0)
        with torch.no_grad():
            from atu.hidden import hidden_at

            drift[weight] = sum(
                state_drift_loss(hidden_at(model, ids, attn, 1), ref, m).item()
                for (ids, attn), ref, m in zip(rs.batches, rs.reference, rs.masks)
            )
    assert drift[10.0] < 0.5 * drift[0.0], drift
