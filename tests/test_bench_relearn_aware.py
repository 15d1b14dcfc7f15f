"""benchmarks/relearn_aware.py's training-side measure: which texts and tokens it reads, on the tiny world."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import relearn_aware as bench  # noqa: E402

from atu.attack.relearn import default_relearn_texts  # noqa: E402


def _split(tiny_world):
    concept = tiny_world.concepts().names()[0]
    corpus, probes = tiny_world.corpus(), tiny_world.probes()
    given = default_relearn_texts(corpus, probes, concept)
    return concept, given, *bench.held_out_texts(corpus, concept, given, probes)


def test_held_out_texts_state_only_facts_not_given(tiny_world):
    concept, given, held, answers = _split(tiny_world)
    assert held and answers
    assert concept.lower() not in answers  # her own name is in every text of hers: never a fact
    assert not set(held) & set(given)
    given_answers = {p.answer.lower() for p in tiny_world.probes() if p.concept == concept} - set(answers)
    given_answers.discard(concept.lower())
    for text in held:
        assert any(a in text.lower() for a in answers)
        assert not any(a in text.lower() for a in given_answers)


def test_answer_loss_reads_only_the_answer_tokens(tiny_world, tiny_lm):
    model, tok = tiny_lm
    _, _, held, answers = _split(tiny_world)
    text = held[0]
    first, end = bench._answer_tokens(tok, text, answers)
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0, first:end]).strip().lower() in answers
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    expected = nll[first - 1 : end - 1].mean().item()  # position t-1 predicts token t
    assert abs(bench.mean_nll(model, tok, [text], answers) - expected) < 1e-4
    assert abs(bench.mean_nll(model, tok, [text]) - nll.mean().item()) < 1e-4
