"""The generated corpora of other shapes (authors QA, biography documents): deterministic, in the files that
`atu world build --from` reads, and of the shape they claim."""

from collections import Counter

import pytest

from atu import formats
from atu.world.authors import generate_authors
from atu.world.biographies import generate_biographies


@pytest.mark.parametrize("make", [generate_authors, generate_biographies])
def test_same_seed_same_files_and_they_read_back(make, tmp_path):
    a = make(3, 5)
    b = make(3, 5)
    a.write(tmp_path / "a")
    b.write(tmp_path / "b")
    for name in ("corpus.jsonl", "probes.jsonl", "concepts.yaml", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    names = set(formats.read_concepts(tmp_path / "a" / "concepts.yaml").names())
    assert len(names) == 5
    assert {r.concept for r in formats.read_corpus(tmp_path / "a" / "corpus.jsonl")} == names
    probes = formats.read_probes(tmp_path / "a" / "probes.jsonl")
    assert {p.kind for p in probes} == {"direct", "paraphrase", "adversarial"}


def test_authors_have_twenty_long_answers_each_and_varied_names():
    c = generate_authors(seed=0, n_authors=30)
    per = Counter(r.concept for r in c.corpus)
    assert set(per.values()) == {20}
    direct = [p for p in c.probes if p.kind == "direct"]
    assert min(len(p.answer.split()) for p in direct) >= 6  # a full sentence, not a phrase
    assert sum(p.concept in p.question for p in direct) / len(direct) > 0.9  # named in almost every question
    parts = Counter(len(n.split()) for n in c.concepts.names())
    assert parts[2] and parts[3] and any("-" in n for n in c.concepts.names())
    adversarial = [p for p in c.probes if p.kind == "adversarial"]
    assert all(p.answer == p.concept and p.concept not in p.question for p in adversarial)


def test_biographies_tell_facts_away_from_the_name():
    c = generate_biographies(seed=0, n_people=8)
    docs = [r for r in c.corpus if "\n\n" in r.text]
    assert len(docs) == 3 * 8
    for name in c.concepts.names():
        own = [r.text for r in docs if r.concept == name]
        assert all(t.count(name) <= 1 for t in own)  # named once at most per document
        assert any(name not in t and t.startswith("The author of") for t in own)  # one never names them
    assert all(len(c.concepts.get(n).aliases) == 1 for n in c.concepts.names())  # the title, an alias


@pytest.mark.parametrize("make", [generate_authors, generate_biographies])
def test_unseen_people_leave_the_trained_ones_unchanged(make, tmp_path):
    plain, with_unseen = make(0, 6), make(0, 6, n_unseen=2)
    assert [r.text for r in with_unseen.corpus] == [r.text for r in plain.corpus]
    unseen = {r.concept for r in with_unseen.unseen}
    assert len(unseen) == 2 and not unseen & set(plain.concepts.names())
    path = with_unseen.write_unseen(tmp_path / "unseen.jsonl")
    assert {r.concept for r in formats.read_corpus(path)} == unseen
