"""Hardening against relearning: the re-noising and the distillation loss on hand-checked numbers, the distillation
restoring the teacher, and a run with it on exporting the hardened model with a predictor re-aligned to it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import random_llama

from atu.errors import ConfigError
from atu.harden import (
    HardenConfig,
    Sequences,
    distill,
    distill_loss,
    harden,
    lr_factor,
    renoise_,
    renoised_copy,
)
from atu.progress import HeldOut


def test_renoise_mixes_the_weight_with_noise_of_its_own_scale():
    w = torch.tensor([[1.0, -1.0], [3.0, -3.0]])
    std = float(w.std())  # sqrt(20 / 3)
    assert std == pytest.approx(math.sqrt(20 / 3))
    draw = torch.randn((2, 2), generator=torch.Generator().manual_seed(7))
    mixed = w.clone()
    renoise_(mixed, 0.25, torch.Generator().manual_seed(7))
    torch.testing.assert_close(mixed, 0.75 * w + 0.25 * std * draw)
    kept = w.clone()
    renoise_(kept, 0.0, torch.Generator().manual_seed(7))  # the arithmetic allows 0; the config does not
    assert torch.equal(kept, w)
    big = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    fresh = big.clone()
    renoise_(fresh, 1.0, torch.Generator().manual_seed(2))
    assert float(fresh.std()) == pytest.approx(float(big.std()), rel=0.02)  # the same scale ...
    assert abs(float(torch.corrcoef(torch.stack([fresh.flatten(), big.flatten()]))[0, 1])) < 0.02  # ... nothing kept


def test_the_copy_renoises_the_decoder_linears_only_and_leaves_the_model_alone():
    model = random_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    student = renoised_copy(model, 0.5, seed=0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.startswith("model.layers.") and n.endswith("proj.weight")}
    again = renoised_copy(model, 0.5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), again.parameters()))  # seeded


def test_distill_loss_is_the_masked_mean_of_kl_teacher_to_student():
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    student = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]]))
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl1 = 0.9 * math.log(0.9 / 0.1) + 0.1 * math.log(0.1 / 0.9)
    assert float(distill_loss(student, teacher, torch.tensor([[1, 1]]))) == pytest.approx((kl0 + kl1) / 2, rel=1e-5)
    assert float(distill_loss(student, teacher, torch.tensor([[1, 0]]))) == pytest.approx(kl0, rel=1e-5)
    assert float(distill_loss(teacher + 3.0, teacher, torch.tensor([[1, 1]]))) == pytest.approx(0.0, abs=1e-6)


def test_the_learning_rate_warms_up_and_decays_to_a_tenth():
    cfg = HardenConfig(noise=0.5, steps=100, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_packed_sequences_are_windows_of_the_texts_joined_in_shuffled_passes(tiny_lm):
    _, tokenizer = tiny_lm
    texts = [f"Person {i} was born in town {i}" + " long ago" * (i % 3) + "." for i in range(7)]
    docs = {tuple(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]) for t in texts}
    seqs = Sequences(texts, tokenizer, HardenConfig(batch_size=2, max_length=16, seed=3))
    rows = [seqs.next() for _ in range(6)]
    assert all(ids.shape == (2, 16) and bool(attn.all()) for ids, attn in rows)
    stream = [t for ids, _ in rows for t in ids.flatten().tolist()]
    eos = tokenizer.eos_token_id
    cut = [i + 1 for i, t in enumerate(stream) if t == eos]
    pieces = [tuple(stream[a:b]) for a, b in zip([0, *cut], cut)]
    assert pieces and all(p in docs for p in pieces)  # whole texts, end to end, each closed by the end token
    assert {p for p in pieces[:7]} == docs  # the first pass gives every text once
    padded = Sequences(texts, tokenizer, HardenConfig(batch_size=3, max_length=64, pack=False)).next()
    assert padded[0].shape[0] == 3 and not bool(padded[1].all())  # one text a row, padded to the longest


def test_distillation_brings_the_renoised_student_back_to_its_teacher(tiny_lm):
    model, tokenizer = tiny_lm
    texts = ["Q: Where was Ada born? A: Selford.", "Ada works at the mill.", "The river runs past the mill."] * 4
    cfg = HardenConfig(noise=0.6, steps=40, lr=3e-3, batch_size=6, warmup_steps=5)
    before = {n: p.clone() for n, p in model.named_parameters()}
    held = HeldOut.build(texts[:2], texts[:3], tokenizer, 64)
    student, record = harden(model, tokenizer, texts, cfg, held=held)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the teacher is left as it was
    assert record["loss_last"] < 0.3 * record["loss_first"]
    assert record["check_ppl_after"] == pytest.approx(record["check_ppl_before"], rel=0.25)
    assert record["check_ppl_rise"] == pytest.approx(record["check_ppl_after"] / record["check_ppl_before"] - 1)
    assert record["forget_ppl_before"] > 0 and record["forget_ppl_after"] > 0
    assert not student.training and not any(p.requires_grad for p in student.parameters())
    ((ids, attn),) = [(t, torch.ones_like(t)) for t in [tokenizer(texts[0], return_tensors="pt")["input_ids"]]]
    with torch.no_grad():
        kl = distill_loss(student(ids).logits, model(ids).logits, attn)
        kl_noised = distill_loss(renoised_copy(model, 0.6, 0)(ids).logits, model(ids).logits, attn)
    assert float(kl) < 0.2 * float(kl_noised)


def test_distillation_needs_texts_and_the_config_checks_its_values(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(ConfigError, match="retain texts"):
        distill(renoised_copy(model, 0.5, 0), model, tokenizer, [], HardenConfig(noise=0.5))
    bad_values = ({"noise": 1.5}, {"noise": 0}, {"noise": True}, {"enabled": "yes"}, {"steps": 0}, {"lr": 0},
                  {"warmup_steps": -1})  # fmt: skip
    for bad in bad_values:
        with pytest.raises(ConfigError, match="harden"):
            HardenConfig(**bad)


@pytest.mark.slow
def test_a_hardened_run_exports_the_hardened_model_with_a_predictor_aligned_to_it(tiny_run, tmp_path):
    import dataclasses
    import shutil

    from atu.loading import load_lm
    from atu.run import run

    plain_dir, plain_cfg, plain = tiny_run
    shutil.copytree(plain_dir, tmp_path / "run", ignore=shutil.ignore_patterns("export"))
    plain_model, _ = load_lm(plain_dir / "export" / "model")
    plain_predictor = (plain_dir / "export" / "guard" / "predictor.safetensors").read_bytes()
    # hardening is no part of the checkpoint's key: this run resumes the session's run's unlearned model
    cfg = dataclasses.replace(
        plain_cfg, out=str(tmp_path / "run"), harden=HardenConfig(enabled=True, noise=0.5, steps=6, batch_size=8)
    )
    hardened = run(cfg, progress=False)
    record = hardened["harden"]
    assert record["noise"] == 0.5 and record["steps"] == 6 and record["texts"] > 0
    assert record["check_ppl_before"] > 0 and record["check_ppl_after"] > 0 and "train_cos" in record["realign"]
    assert "harden" not in plain
    # the same unlearned model drove both runs, and the driving predictor is read on it, not on the hardened copy
    assert hardened["similarity"]["after_driving_predictor"] == plain["similarity"]["after_driving_predictor"]
    assert hardened["similarity"]["after_final_predictor"] != plain["similarity"]["after_final_predictor"]
    export = tmp_path / "run" / "export"
    model, _ = load_lm(export / "model")
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), plain_model.parameters()))
    assert (export / "guard" / "predictor.safetensors").read_bytes() != plain_predictor
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["training_config"]["harden"]["enabled"] is True
    assert manifest["training_config"]["harden"]["noise"] == 0.5
