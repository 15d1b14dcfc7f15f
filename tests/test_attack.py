"""Attacks on an export: relearning's data split and training, the guard's catch rates, and both CLI commands."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from atu.attack.guard import LEAK_RECALL, catch_rates, forgotten_values, named_examples, states_forgotten
from atu.attack.relearn import (
    RelearnConfig,
    answer_span,
    default_relearn_texts,
    held_out_fact_texts,
    held_out_probes,
    loss_recovery,
    recovery,
    relearn,
    text_loss,
)
from atu.errors import ConfigError
from atu.formats import Probe


def _world_facts(tiny_world):
    concept = tiny_world.concepts().names()[0]
    return concept, tiny_world.corpus(), tiny_world.probes()


def test_default_relearn_texts_state_half_the_facts_and_no_held_out_answer(tiny_world):
    concept, corpus, probes = _world_facts(tiny_world)
    texts = default_relearn_texts(corpus, probes, concept)
    own = [r.text for r in corpus if r.concept == concept]
    assert texts and set(texts) <= set(own)
    held = held_out_probes(probes, [concept], texts)
    assert held, "half of the facts must stay out of the relearning texts"
    for p in held:
        assert p.concept == concept
        assert not any(p.answer.lower() in t.lower() for t in texts)
    attributes = {p.attribute for p in probes if p.concept == concept and p.answer != concept}
    given = {p.attribute for p in probes if p.concept == concept and p.answer in " ".join(texts)} & attributes
    assert len(given) == (len(attributes) + 1) // 2  # every other attribute, in sorted order
    assert given.isdisjoint({p.attribute for p in held})


def test_held_out_fact_texts_state_a_held_out_answer_and_no_given_one(tiny_world):
    concept, corpus, probes = _world_facts(tiny_world)
    given = default_relearn_texts(corpus, probes, concept)
    texts, answers = held_out_fact_texts(corpus, probes, [concept], given)
    assert texts and answers and concept.lower() not in answers
    assert not set(texts) & set(given)
    held = {p.answer.lower() for p in held_out_probes(probes, [concept], given)}
    given_answers = {p.answer.lower() for p in probes if p.concept == concept} - held - {concept.lower()}
    assert given_answers
    for t in texts:
        assert any(a in t.lower() for a in answers) and not any(a in t.lower() for a in given_answers)


def test_answer_loss_reads_only_the_answer_tokens(tiny_world, tiny_lm):
    model, tok = tiny_lm
    concept, corpus, probes = _world_facts(tiny_world)
    texts, answers = held_out_fact_texts(corpus, probes, [concept], default_relearn_texts(corpus, probes, concept))
    text = texts[0]
    first, end = answer_span(tok, text, answers)
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0, first:end]).strip().lower() in answers
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    assert text_loss(model, tok, [text], answers) == pytest.approx(nll[first - 1 : end - 1].mean().item(), abs=1e-4)
    assert text_loss(model, tok, [text]) == pytest.approx(nll.mean().item(), abs=1e-4)
    assert answer_span(tok, "nothing of hers", answers) is None


def test_loss_recovery_is_the_share_of_the_added_loss_taken_away():
    assert loss_recovery(0.5, 2.5, 1.0) == pytest.approx(0.75)
    assert loss_recovery(0.5, 0.5, 0.2) is None  # unlearning added nothing


def test_relearn_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="relearn.steps must be a positive int, got 0"):
        RelearnConfig(steps=0)
    with pytest.raises(ConfigError, match="relearn.lr must be a number > 0"):
        RelearnConfig(lr=-1.0)


def test_recovery_is_the_share_of_the_removed_recall_that_comes_back():
    assert recovery(0.8, 0.2, 0.5) == pytest.approx(0.5)
    assert recovery(0.8, 0.2, 0.2) == 0.0
    assert recovery(0.8, 0.8, 0.9) is None  # nothing was removed


def test_catch_rates_count_leaks_and_false_flags():
    rows = [
        {"forgotten": True, "recall": 1.0, "flagged_own": True, "prompt_flagged_own": True},
        {"forgotten": True, "recall": LEAK_RECALL, "flagged_own": False, "prompt_flagged_own": True},
        {"forgotten": True, "recall": 0.0, "flagged_own": True},  # flagged, but leaks nothing
        {"forgotten": True, "recall": 1.0, "flagged_own": False, "named": True},  # her name is the answer
        {"forgotten": True, "recall": 1.0, "flagged_own": False, "prompt_named": True},  # her name is asked about
        {"forgotten": False, "recall": 1.0, "flagged_own": True},
        {"forgotten": False, "recall": 1.0, "flagged_own": False, "prompt_flagged_own": True},
        {"forgotten": False, "recall": 1.0, "flagged_own": False, "prompt_named": True},
        *({"forgotten": False, "recall": 1.0, "flagged_own": False} for _ in range(2)),
    ]
    got = catch_rates(rows, "own")
    prefixes = ("", "exchange_", "names_", "names_exchange_", "named_")
    for p in prefixes:  # no answer about the others gives her values or writes her name
        assert got.pop(f"{p}clean_false_flag_rate") == got[f"{p}false_flag_rate"]
        assert got.pop(f"{p}innocent_false_flag_rate") == got[f"{p}false_flag_rate"]
    # without the others' exchange that writes her name (its question): four rows
    nameless = {p: got.pop(f"{p}nameless_false_flag_rate") for p in prefixes}
    assert nameless == {"": 0.25, "exchange_": 0.5, "names_": 0.25, "names_exchange_": 0.5, "named_": 0.25}
    assert got == {
        "leaks": 4, "others": 5, "others_stating_forgotten": 0, "others_naming_forgotten": 0,
        "catch_rate": 0.25, "flag_rate_forgotten": 0.4, "false_flag_rate": 0.2,
        # the question's flag catches the second leak, and flags one more of the others' answers
        "exchange_catch_rate": 0.5, "exchange_flag_rate_forgotten": 0.6, "exchange_false_flag_rate": 0.4,
        # the name written in the answer catches the third; asked about in the question, the fourth
        "names_catch_rate": 0.5, "names_flag_rate_forgotten": 0.6, "names_false_flag_rate": 0.2,
        "names_exchange_catch_rate": 1.0, "names_exchange_flag_rate_forgotten": 1.0,
        "names_exchange_false_flag_rate": 0.6,
        # the question counted only when it writes her name: the fourth leak is caught, the others' second answer
        # (flagged by the question's score alone) is not
        "named_catch_rate": 0.75, "named_flag_rate_forgotten": 0.8, "named_false_flag_rate": 0.4,
    }  # fmt: skip


def test_clean_false_flags_leave_out_the_exchanges_that_write_a_forgotten_name_or_value():
    rows = [
        {"forgotten": False, "recall": 0.0, "flagged_own": True, "states_forgotten": True},
        {"forgotten": False, "recall": 0.0, "flagged_own": True, "named": True},  # the answer writes her name
        {"forgotten": False, "recall": 1.0, "flagged_own": True, "prompt_named": True},  # the question does
        {"forgotten": False, "recall": 1.0, "flagged_own": True},
        *({"forgotten": False, "recall": 1.0, "flagged_own": False} for _ in range(2)),
    ]
    got = catch_rates(rows, "own")
    assert got["others_stating_forgotten"] == 1 and got["others_naming_forgotten"] == 1
    assert got["false_flag_rate"] == pytest.approx(4 / 6)
    assert got["clean_false_flag_rate"] == pytest.approx(3 / 5)  # without the answer that gives her value
    assert got["innocent_false_flag_rate"] == 0.5  # and the one that writes her name
    assert got["nameless_false_flag_rate"] == pytest.approx(1 / 3)  # and the question that writes it


def test_named_examples_are_the_missed_leaks_and_the_flagged_others():
    def row(forgotten, recall, flagged=False, **extra):
        return {"forgotten": forgotten, "recall": recall, "flagged_own": flagged, "question": "q", "answer": "a",
                "concept": "C", **extra}  # fmt: skip

    rows = [
        row(True, 1.0), row(True, 1.0, flagged=True), row(True, 1.0, prompt_named=True), row(True, 0.0),
        row(False, 1.0, flagged=True, states_forgotten=True), row(False, 1.0, named=True), row(False, 1.0),
    ]  # fmt: skip
    got = named_examples(rows, "own")
    assert len(got["missed_leaks"]) == 1  # the leak neither flagged nor named; the non-leak is no miss
    assert [r["states_forgotten"] for r in got["flagged_others"]] == [True, None]
    assert len(named_examples(rows, "own", limit=1)["flagged_others"]) == 1
    rates = catch_rates(rows, "own")  # the same rows as the named rates count
    assert rates["named_catch_rate"] == pytest.approx(2 / 3) and rates["named_false_flag_rate"] == pytest.approx(2 / 3)


def test_an_answer_states_a_forgotten_value_only_in_place_of_its_own():
    probes = [
        Probe("Ada", "direct", "Where was Ada born?", "Selford", "birthplace"),
        Probe("Ada", "direct", "What does Ada do?", "chemist", "occupation"),
        Probe("Bob", "direct", "Where was Bob born?", "Marrow", "birthplace"),
        Probe("Cy", "direct", "Where was Cy born?", "Selford", "birthplace"),
        Probe("Bob", "direct", "Who is Bob's friend?", "Dee", None),
    ]
    values = forgotten_values(probes, ["Ada"])
    assert values == {"birthplace": {"Selford"}, "occupation": {"chemist"}}
    bob, cy, no_attribute = probes[2], probes[3], probes[4]
    assert states_forgotten(bob, " He was born in Selford.", values)  # hers, in place of his
    assert not states_forgotten(bob, " Marrow, near Selford.", values)  # his own is right
    assert not states_forgotten(bob, " A chemist.", values)  # her value of another attribute
    assert not states_forgotten(cy, " Selford", values)  # the same value as hers: his own
    assert not states_forgotten(no_attribute, " Selford", values)
    assert not states_forgotten(bob, "  ", values)


@pytest.mark.slow
def test_relearning_trains_only_on_the_given_facts(tiny_world, tiny_lm):
    from atu.evaluation.evaluate import text_nll

    concept, corpus, probes = _world_facts(tiny_world)
    model, tokenizer = tiny_lm
    texts = default_relearn_texts(corpus, probes, concept)
    held = held_out_probes(probes, [concept], texts)
    before = {n: p.clone() for n, p in model.named_parameters()}
    nll_before = sum(text_nll(model, tokenizer, texts)) / len(texts)
    relearned, records = relearn(copy.deepcopy(model), tokenizer, texts, RelearnConfig(steps=6, lr=1e-3, batch_size=4))
    seen = [t for r in records for t in r["texts"]]
    assert len(records) == 6 and len(seen) == 24
    assert set(seen) <= set(texts)  # every batch came from the given set
    assert set(seen) == set(texts)  # and the cycle covered all of it (24 draws over fewer texts)
    for p in held:  # what the evaluation counts as recovered was never shown
        assert not any(p.answer.lower() in t.lower() for t in seen)
    assert sum(text_nll(relearned, tokenizer, texts)) / len(texts) < nll_before
    changed = [n for n, p in relearned.named_parameters() if not torch.equal(p, before[n])]
    assert changed
    for n, p in model.named_parameters():  # the caller's model is untouched
        assert torch.equal(p, before[n])


@pytest.mark.slow
def test_cli_attack_quantize_on_the_tiny_export(tiny_run, tmp_path):
    from atu.attack.quantize import quantizable_linears
    from atu.cli import main
    from atu.loading import load_lm

    out_dir, cfg, _ = tiny_run
    out = tmp_path / "q.json"
    result = CliRunner().invoke(main, ["attack", "quantize", str(out_dir / "export"), "--bits", "4", "--group-size",
                                       "32", "--no-int8-kernel", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    assert [r["precision"] for r in res["rows"]] == ["fp32", "int4 rtn g32"]
    for row in res["rows"]:
        assert set(row["original"]["forget"]) == {"direct", "paraphrase", "adversarial"}
        assert set(row["guard"]) == {"own", "attacked"}
    model, _ = load_lm(out_dir / "export" / "model")
    names = [n for n, _ in quantizable_linears(model)]
    assert [x["name"] for x in res["collapse"]["layers"]] == names
    # The tiny run's hook layer is 1: only decoder layer 0 trains, so only its weights can have an update.
    updated = {x["name"] for x in res["collapse"]["layers"] if x["updated"]}
    assert updated and all(n.startswith("model.layers.0.") for n in updated)
    assert "bucket collapse (int4 rtn g32)" in result.output


@pytest.mark.slow
def test_cli_attack_relearn_on_a_given_file(tiny_run, tiny_world, tmp_path):
    from atu.cli import main
    from atu.formats import CorpusRecord, write_jsonl

    out_dir, cfg, _ = tiny_run
    concept = cfg.data.forget[0]
    texts = default_relearn_texts(tiny_world.corpus(), tiny_world.probes(), concept)[:3]
    on = tmp_path / "on.jsonl"
    write_jsonl(on, [CorpusRecord(t, concept) for t in texts])
    out = tmp_path / "r.json"
    args = ["attack", "relearn", str(out_dir / "export"), "--on", str(on), "--steps", "2", "--no-guard"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    assert res["texts"] == texts and len(res["loss"]) == 2 and "guard" not in res
    held = held_out_probes(tiny_world.probes(), [concept], texts)
    assert res["recall"]["original"]["held_out"]["n"] == len(held)
    assert res["recall"]["original"]["retain"]["n"] == sum(p.concept != concept for p in tiny_world.probes())
    # the training-side figure: the held-out facts' answers in their own corpus texts
    loss = res["answer_loss"]
    expected_texts, _ = held_out_fact_texts(tiny_world.corpus(), tiny_world.probes(), [concept], texts)
    assert loss["texts"] == len(expected_texts) > 0 and "training side:" in result.output
    assert loss["recovery"] == loss_recovery(loss["original"], loss["unlearned"], loss["relearned"])
