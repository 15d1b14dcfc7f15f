"""benchmarks/relearn_aware.py's training-side measure: which texts it reads, on the tiny world."""

import sys
from pathlib import Path

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
