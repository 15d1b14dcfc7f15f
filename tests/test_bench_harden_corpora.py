"""The pure parts of benchmarks/harden_corpora.py: the run's figures and the table."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import generality  # noqa: E402
import harden_corpora as bench  # noqa: E402


def _eval(forget: float, retain: float, ppl: float) -> dict:
    return {
        "forget": {"direct": forget, "paraphrase": forget / 2},
        "neighbour": {"direct": 1.0},
        "retain": {"direct": retain, "paraphrase": retain},
        "retain_perplexity": ppl,
    }


def test_summary_figures_average_forget_over_kinds_and_take_the_lowest_retain():
    before, after = _eval(0.8, 1.0, 10.0), _eval(0.2, 0.9, 11.0)
    after["retain"]["paraphrase"] = 0.95
    got = bench.summary_figures({"before": before, "after": after, "harden": {"check_ppl_rise": 0.4}})
    assert got["forget_ratio"] == pytest.approx(0.25)  # 0.2/0.8 and 0.1/0.4
    assert got["retain_ratio"] == pytest.approx(0.9)  # the lower of 0.9 and 0.95
    assert got["perplexity_ratio"] == pytest.approx(1.1)
    assert got["harden"] == {"check_ppl_rise": 0.4}


def test_the_table_shows_each_method_and_says_why_relearning_did_not_run(tmp_path):
    def method(rise=None, relearn=None, error=None):
        return {"forget_ratio": 0.3, "retain_ratio": 0.98, "perplexity_ratio": 1.05, "run_seconds": 12.5,
                "harden": None if rise is None else {"check_ppl_rise": rise}, "relearn": relearn,
                "relearn_error": error}  # fmt: skip

    run = {"corpus": "biographies", "seed": 0,
           "atu": method(relearn={"10": {"held_out": 0.75, "answer_loss": 0.5}}),
           "atu-h": method(rise=0.48, error="no single-fact texts")}  # fmt: skip
    text = bench.write_markdown({"runs": [run], "steps": [10], "machine": "m", "date": "d", "total_seconds": 1},
                                tmp_path / "t.md")  # fmt: skip
    rows = [line for line in text.splitlines() if line.startswith("| biographies")]
    assert rows[0] == "| biographies | 0 | atu | 0.30 | 0.98 | 1.05 | - | 0.75 / 0.50 | 12.5 |"
    assert (
        rows[1] == "| biographies | 0 | atu-h | 0.30 | 0.98 | 1.05 | +48.0% | not run: no single-fact texts | 12.5 |"
    )  # noqa: E501
    assert (tmp_path / "t.md").read_text() == text


def test_quick_settings_leave_the_hook_layer_to_the_library():
    assert generality.shipped_settings()["align"]["hook_layer"] == 3  # the world model's, 3 of its 4
    quick = generality.shipped_settings(quick=True)
    assert "hook_layer" not in quick["align"] and quick["align"]["window"] == 8
