import filecmp
import json

import pytest

from atu import formats
from atu.errors import ConfigError, FormatError
from atu.formats import PROBE_KINDS
from atu.world.build import build_world
from atu.world.config import WorldConfig
from atu.world.generate import generate_world
from atu.world.templates import ATTRIBUTES, TEMPLATES
from atu.world.tokenizer import train_tokenizer


def test_same_seed_same_world():
    a, b = generate_world(7, 12, 3), generate_world(7, 12, 3)
    assert a.corpus == b.corpus and a.probes == b.probes and a.concepts == b.concepts


def test_different_seed_different_people():
    a, b = generate_world(1, 12, 0), generate_world(2, 12, 0)
    assert set(a.concepts.names()) != set(b.concepts.names())


def test_default_world_shape():
    w = generate_world(0, 40, 10)
    assert len(w.people) == 40 and len(w.unseen) == 10
    names = [p.name for p in w.people]
    assert len(set(names)) == 40
    assert not set(names) & {p.name for p in w.unseen}
    for p in w.people:
        assert len(p.facts) >= 8
    # Links exist: some people share an employer, some are married to each other.
    employers = [p.facts["employer"] for p in w.people]
    assert len(set(employers)) < len(employers)
    spouses = {p.name: p.facts["spouse"] for p in w.people}
    married_in_world = [n for n, s in spouses.items() if spouses.get(s) == n]
    assert len(married_in_world) >= 2
    assert all(c.neighbours for c in w.concepts.concepts if c.name in married_in_world)


def test_every_fact_in_three_training_phrasings():
    w = generate_world(3, 6, 0)
    for p in w.people:
        texts = [r.text for r in w.corpus if r.concept == p.name]
        for a in ATTRIBUTES:
            phrasings = [t.format(n=p.name, v=p.facts[a]) for t in TEMPLATES[a]["statements"]]
            assert len(phrasings) >= 3
            assert all(any(ph in t for t in texts) for ph in phrasings), (p.name, a)


def test_probe_kinds_for_every_person_and_paraphrases_unseen():
    w = generate_world(0, 10, 0)
    corpus = "\n".join(r.text for r in w.corpus)
    for name in w.concepts.names():
        kinds = {p.kind for p in w.probes if p.concept == name}
        assert kinds == set(PROBE_KINDS)
    for p in w.probes:
        if p.kind == "direct":
            assert f"Q: {p.question}\nA: {p.answer}" in corpus
        if p.kind == "paraphrase":
            assert p.question not in corpus


def test_tokenizer_round_trip():
    w = generate_world(0, 6, 0)
    tok = train_tokenizer([r.text for r in w.corpus], vocab_size=400)
    for text in ["Q: Where was Ceda born?\nA: Selford", "Zoë café 東京 — naïve ☃", "  two  spaces\tand tab"]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Who?"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>Q: Who?\nA:"


def test_world_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key 'layers'"):
        WorldConfig.from_dict({"lm": {"layers": 3}})
    with pytest.raises(ConfigError, match="divisible"):
        WorldConfig.from_dict({"lm": {"hidden_size": 30, "num_attention_heads": 4}})
    with pytest.raises(ConfigError, match="n_people"):
        WorldConfig(n_people=1)


def test_tiny_world_build_is_cached_and_complete(tiny_world, cache_root):
    for name in ("corpus.jsonl", "probes.jsonl", "concepts.yaml", "heldout.jsonl", "unseen.jsonl", "build.json"):
        assert (tiny_world.root / name).is_file(), name
    assert (tiny_world.model_dir / "model.safetensors").is_file()
    assert not list(tiny_world.model_dir.glob("*.bin"))
    info = tiny_world.build_info()
    assert info["loss_last"] < info["loss_first"]
    again = build_world(WorldConfig.tiny(), root=cache_root, progress=False)
    assert again.root == tiny_world.root


def test_build_from_user_directory(tiny_world, cache_root, tmp_path):
    src = tmp_path / "mine"
    src.mkdir()
    for name in ("corpus.jsonl", "probes.jsonl", "concepts.yaml"):
        (src / name).write_bytes((tiny_world.root / name).read_bytes())
    built = build_world(WorldConfig.tiny(), source=src, root=cache_root, progress=False)
    assert built.root != tiny_world.root
    assert filecmp.cmp(built.path("corpus.jsonl"), src / "corpus.jsonl", shallow=False)
    assert json.loads((built.model_dir / "config.json").read_text())["num_hidden_layers"] == 2


def test_build_from_directory_rejects_missing_and_unknown_concepts(tiny_world, cache_root, tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    with pytest.raises(FormatError, match="missing corpus.jsonl"):
        build_world(WorldConfig.tiny(), source=src, root=cache_root, progress=False)
    for name in ("corpus.jsonl", "probes.jsonl"):
        (src / name).write_bytes((tiny_world.root / name).read_bytes())
    formats.write_concepts(src / "concepts.yaml", tiny_world.concepts().subset(tiny_world.concepts().names()[:1]))
    with pytest.raises(FormatError, match="is not in concepts.yaml"):
        build_world(WorldConfig.tiny(), source=src, root=cache_root, progress=False)
