"""The guard's lexical check: concept names written out in text (serve/names.py), alone and inside the scorer."""

from __future__ import annotations

import numpy as np
from toy_scorer import TABLE, ByteTokenizer, Identity, TableBackend, byte_id

from atu.index import ConceptIndex
from serve.names import NameMatcher
from serve.scoring import Scorer


def _spans(matcher, text, start=0):
    return {row: text[a:b] for row, (a, b) in matcher.find(text, start).items()}


def test_names_match_as_whole_words_whatever_the_case_and_the_separators():
    m = NameMatcher(["Ceda Kestridge", "Anne-Marie O'Neil", "C. Moss"])
    assert _spans(m, "I met ceda  KESTRIDGE's sister.") == {0: "ceda  KESTRIDGE"}
    assert _spans(m, "Ceda-Kestridge; anne marie o\u2019neil") == {0: "Ceda-Kestridge", 1: "anne marie o\u2019neil"}
    assert _spans(m, "signed C.Moss and c moss") == {2: "C.Moss"}  # the first occurrence
    for text in ("Cedar Kestridge", "Ceda Kestridges", "XCeda Kestridge", "Ceda, who is Kestridge", "Ceda"):
        assert m.find(text) == {}, text


def test_short_and_letterless_labels_are_not_matched_and_start_never_cuts_a_word():
    m = NameMatcher(["1984", "Al", "Ul Tor", "Selford"])
    assert len(m) == 2  # "1984" (no letter) and "Al" (two letters) would flag ordinary text
    assert _spans(m, "In 1984 Al went to Selford with ul tor.") == {2: "ul tor", 3: "Selford"}
    text = "born in Selford"
    # a start inside a word goes back to the word's start: the word is read whole, never as its tail
    assert _spans(m, text, start=text.index("Selford") + 3) == {3: "Selford"}
    assert m.find(text, start=len(text)) == {}
    assert m.max_chars >= len("Selford")


def test_many_labels_are_looked_up_not_scanned():
    labels = [f"Person{i} Surname{i}" for i in range(20_000)]
    m = NameMatcher(labels)
    assert _spans(m, "notes on person19999 surname19999 and Person7 Surname7") == {
        19_999: "person19999 surname19999", 7: "Person7 Surname7"}  # fmt: skip


def _scorer(names: bool):
    labels = ["Ceda Kestridge", "Isic Langby"]
    index = ConceptIndex.build(TABLE[[byte_id("#"), byte_id("%")]], labels, [0.99, 0.99])
    return Scorer(TableBackend(TABLE), ByteTokenizer(), Identity(), index, max_tokens=256, top_k=1,
                  names=NameMatcher(labels) if names else None)  # fmt: skip


def test_a_concept_named_in_a_part_is_flagged_there_whatever_its_score():
    prompt, completion = "Who wrote it? ", "It was ceda kestridge, in 1934."
    plain = _scorer(False).score(prompt, completion)
    assert plain.flagged == [] and plain.prompt_flagged == []  # neither concept's vector is in the text
    report = _scorer(True).score(prompt, completion)
    assert report.flagged == ["Ceda Kestridge"] and report.prompt_flagged == []
    named = [s for s in report.completion if s.named]
    assert [s.concept for s in named] == ["Ceda Kestridge"] and named[0].flagged
    assert named[0].score < named[0].threshold and named[0].excerpt.startswith("ceda kestridge")
    assert all(not s.named and not s.flagged for s in report.completion if s.concept != "Ceda Kestridge")
    asked = _scorer(True).score("Where was Isic Langby born? ", "Selford.")
    assert asked.prompt_flagged == ["Isic Langby"] and asked.flagged == []


def test_a_stream_scored_as_it_grows_finds_a_name_completed_in_its_new_text_only():
    scorer, prompt = _scorer(True), "Q: "
    first = "The answer is Ceda"
    grown = first + " Kestridge, of course."
    assert scorer.score_batch([(prompt, first)])[0].flagged == []
    (later,) = scorer.score_batch([(prompt, grown)], since=[len(first)])
    assert later.flagged == ["Ceda Kestridge"]  # the name began in text scored before
    old = "Ceda Kestridge. " + "x" * 200
    (again,) = scorer.score_batch([(prompt, old + " more")], since=[len(old)])
    assert again.flagged == [] and again.prompt_flagged == []  # scored before: not searched again
    whole = scorer.score(prompt, old + " more")
    assert whole.flagged == ["Ceda Kestridge"]
    assert np.isfinite(whole.max_score)
