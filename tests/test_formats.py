import json

import pytest

from atu import formats
from atu.errors import FormatError


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_corpus_round_trip(tmp_path):
    recs = [formats.CorpusRecord("Ada was born in Selford.", "Ada"), formats.CorpusRecord("Plain text.", None)]
    formats.write_jsonl(tmp_path / "c.jsonl", recs)
    assert formats.read_corpus(tmp_path / "c.jsonl") == recs


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok", "concept": 3}', r"c.jsonl:2: field 'concept' must be str or null, got int"),
        ('{"concept": "Ada"}', r"c.jsonl:2: missing field 'text'"),
        ('{"text": "  "}', r"c.jsonl:2: field 'text' is empty"),
        ('{"text": "ok", "topic": "x"}', r"c.jsonl:2: unknown field 'topic'"),
        ('{"text": "ok"', r"c.jsonl:2: invalid JSON"),
        ('["text"]', r"c.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_corpus_errors_name_file_line_field(tmp_path, line, message):
    path = _write(tmp_path / "c.jsonl", ['{"text": "fine", "concept": "Ada"}', line])
    with pytest.raises(FormatError, match=message):
        formats.read_corpus(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(FormatError, match="no records"):
        formats.read_corpus(_write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(FormatError, match="file not found"):
        formats.read_probes(tmp_path / "nope.jsonl")


def test_probes_validate_kind(tmp_path):
    good = {"concept": "Ada", "kind": "direct", "question": "Where?", "answer": "Selford"}
    bad = dict(good, kind="sneaky")
    path = _write(tmp_path / "p.jsonl", [json.dumps(good), json.dumps(bad)])
    with pytest.raises(FormatError, match=r"p.jsonl:2: field 'kind' is 'sneaky'"):
        formats.read_probes(path)
    path = _write(tmp_path / "p.jsonl", [json.dumps(good)])
    assert formats.read_probes(path)[0].answer == "Selford"


def test_concepts_round_trip(tmp_path):
    cs = formats.ConceptSet(
        [
            formats.Concept("Ada Lov", ("Lov",), "a mathematician", 0.5, ("Bo Lov",)),
            formats.Concept("Bo Lov"),
        ]
    )
    formats.write_concepts(tmp_path / "c.yaml", cs)
    assert formats.read_concepts(tmp_path / "c.yaml") == cs


@pytest.mark.parametrize(
    "text, message",
    [
        ("concepts:\n  - name: A\n  - aliases: [x]\n", r"c.yaml:3: missing field 'name'"),
        ("concepts:\n  - name: A\n    threshold: 2\n", r"c.yaml:2: field 'threshold' is 2, must be a cosine"),
        ("concepts:\n  - name: A\n    colour: red\n", r"c.yaml:2: unknown field 'colour'"),
        ("concepts:\n  - name: A\n  - name: A\n", r"c.yaml:3: duplicate concept name 'A'"),
        (
            "concepts:\n  - name: A\n    aliases: [1]\n",
            r"c.yaml:2: field 'aliases' must be a list of non-empty",
        ),
        ("concepts: []\n", r"'concepts' must be a non-empty list"),
        ("people:\n  - name: A\n", r"unknown top-level key 'people'"),
        ("concepts: [\n", r"c.yaml:\d+: invalid YAML"),
    ],
)
def test_concepts_errors(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(FormatError, match=message):
        formats.read_concepts(tmp_path / "c.yaml")


def test_mentioned_in_matches_names_and_aliases_as_whole_words():
    cs = formats.ConceptSet(
        [formats.Concept("Ceda Kestridge", aliases=("Kestridge", "C. Kestridge")), formats.Concept("Bo Li")]
    )
    assert cs.mentioned_in("Jorette Fairgard is married to Ceda Kestridge.") == [0]
    assert cs.mentioned_in("Q: Who wed C. Kestridge?\nA: Bo Li") == [0, 1]
    assert cs.mentioned_in("The Kestridges and Bo Lin") == []  # not inside longer words
    assert cs.mentioned_in("ceda kestridge") == []  # case matters: names are proper nouns
