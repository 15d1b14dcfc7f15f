import json

import pytest
import yaml
from click.testing import CliRunner
from qa_data import make_pairs, write_csv, write_jsonl

from atu import formats
from atu.cli import STRICT_EXIT, main
from atu.errors import ConfigError, FormatError
from atu.qa import Columns, read_qa, write_qa_world

COLUMNS = Columns(question="q", answer="a", subject="who")


def test_jsonl_and_csv_give_the_same_pairs(tmp_path):
    rows = make_pairs(3, 2)
    from_jsonl = read_qa(write_jsonl(tmp_path / "qa.jsonl", rows), COLUMNS)
    from_csv = read_qa(write_csv(tmp_path / "qa.csv", rows), COLUMNS)
    assert from_jsonl == from_csv and len(from_jsonl) == 6
    assert from_jsonl[0].question == rows[0]["q"] and from_jsonl[0].subject == rows[0]["who"]


def test_errors_name_file_row_and_column(tmp_path):
    rows = make_pairs(1, 2)
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(FormatError, match=r"qa\.jsonl:1: no column 'question' \(the question; columns: q, a, who\)"):
        read_qa(path)
    rows[1]["a"] = "  "
    with pytest.raises(FormatError, match=r"qa\.csv:3: column 'a' \(the answer\) must be non-empty text"):
        read_qa(write_csv(tmp_path / "qa.csv", rows), COLUMNS)
    with pytest.raises(FormatError, match="unknown format"):
        read_qa(write_jsonl(tmp_path / "qa.parquet", rows), COLUMNS)


def test_one_code_path_makes_corpus_probes_and_heldout(tmp_path):
    pairs = read_qa(write_jsonl(tmp_path / "qa.jsonl", make_pairs(2, 3)), COLUMNS)
    out = write_qa_world(pairs, tmp_path / "world", template="{subject}. Q: {question}\nA: {answer}")
    corpus = formats.read_corpus(out / "corpus.jsonl")
    probes = formats.read_probes(out / "probes.jsonl")
    heldout = formats.read_corpus(out / "heldout.jsonl")
    assert sorted(formats.read_concepts(out / "concepts.yaml").names()) == sorted({p.subject for p in pairs})
    for pair, text, probe, held in zip(pairs, corpus, probes, heldout):
        assert text.text == f"{pair.subject}. Q: {pair.question}\nA: {pair.answer}" and text.concept == pair.subject
        assert (probe.concept, probe.kind, probe.question, probe.answer) == (
            pair.subject, "direct", pair.question, pair.answer,
        )  # fmt: skip
        assert held.text == f"{pair.question} {pair.answer}" and held.concept == pair.subject
    with pytest.raises(ConfigError, match=r"--template '\{name\}': use only"):
        write_qa_world(pairs, tmp_path / "bad", template="{name}")


def test_plain_retain_texts_feed_the_stopping_signal_and_retain_terms(tmp_path, tiny_world):
    from atu.run_config import RunConfig
    from atu.run_data import load_run_data, resolve_world

    first = tiny_world.concepts().names()[0]
    # Only the forgotten person's texts are labelled: without data.retain there would be no retain text at all.
    corpus = tmp_path / "corpus.jsonl"
    formats.write_jsonl(corpus, [r for r in tiny_world.corpus() if r.concept == first])
    plain = [f"General text number {i} about the weather, the sea and old roads." for i in range(9)]
    plain.append(f"A note that names {first}, so it is not a retain text.")
    (tmp_path / "retain.txt").write_text("\n".join(plain) + "\n")
    cfg = RunConfig.from_dict(
        {
            "model": "world:tiny",
            "data": {
                "corpus": str(corpus),
                "retain": str(tmp_path / "retain.txt"),
                "validation": None,
                "forget": [first],
            },
        }  # fmt: skip
    )
    _, defaults = resolve_world(cfg, progress=False)
    defaults.pop("validation")
    data = load_run_data(cfg, defaults)
    assert data.validation == plain[0:9:3] and data.retain_known == plain[0:9:3]
    assert data.evaluation == plain[1:9:3]
    assert data.retain_texts == plain[2:9:3]
    assert not any(first in t for t in data.validation + data.evaluation + data.retain_texts)


@pytest.mark.slow
def test_your_model_your_data_walkthrough(tmp_path):
    """The README's "Your model, your data", as written there: a QA set of 20 subjects x 10 pairs with long answers,
    imported, a small model trained on it, a run config written, `atu run --strict` reporting the criteria."""
    runner = CliRunner()
    rows = make_pairs(20, 10)
    assert len({r["who"] for r in rows}) == 20 and len(rows) == 200
    source = write_jsonl(tmp_path / "my_qa.jsonl", rows)

    def atu(*args):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        return result

    r = atu("data", "import-qa", source, "--out", tmp_path / "my_world",
            "--question-column", "q", "--answer-column", "a", "--subject-column", "who")  # fmt: skip
    assert r.exit_code == 0 and "200 pairs about 20 subjects" in r.output, r.output
    r = atu("world", "build", "--from", tmp_path / "my_world", "--tiny", "--no-eval", "--run-config",
            tmp_path / "run.yaml", "--forget", rows[0]["who"])  # fmt: skip
    assert r.exit_code == 0, r.output
    raw = yaml.safe_load((tmp_path / "run.yaml").read_text())
    assert raw["data"]["forget"] == [rows[0]["who"]]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(raw["model"])
    longest = max(len(tokenizer(r["a"], add_special_tokens=False).input_ids) for r in rows)
    assert longest >= 60  # long answers, well over the 24-token default
    assert raw["eval"]["max_new_tokens"] > longest  # the written config scores the longest answer whole

    r = atu("run", tmp_path / "run.yaml", "--strict", "--out", tmp_path / "run", "--no-export",
            "--set", "align.epochs=3", "--set", "align.realign_epochs=1", "--set", "align.window=4",
            "--set", "align.max_length=48",
            "--set", "unlearn.taus=[0.6,0.3]", "--set", "unlearn.steps_per_stage=4")  # fmt: skip
    assert "criteria (forget <= 0.25 of before" in r.output
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    # long answers: fact recall (the words the question does not say) is printed and kept beside ROUGE-L
    facts = summary["before"]["facts"]["forget"]["direct"]
    assert 0.0 <= facts <= 1.0 and f"direct {facts:.3f} -> " in r.output, r.output
    assert all("facts" in row for row in summary["before"]["answers"])
    predictions = [row["prediction"] for row in summary["before"]["answers"]]
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in predictions]
    assert max(lengths) > 24, "answers were cut at the old 24-token limit"
    from atu.evaluation.metrics import similarity_criteria, unlearning_criteria

    criteria = unlearning_criteria(summary["before"], summary["after"]) + similarity_criteria(
        summary["similarity"], summary["final_thresholds"], summary["forget"]
    )
    missed = [c for c in criteria if not c["met"]]
    if missed:
        assert r.exit_code == STRICT_EXIT and f"strict: {len(missed)} of {len(criteria)} criteria missed" in r.output
    else:
        assert r.exit_code == 0 and f"strict: all {len(criteria)} criteria met" in r.output
