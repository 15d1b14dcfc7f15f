"""The pure functions of benchmarks/generality.py, on hand-made evaluations."""

import sys
from pathlib import Path

import pytest
from conftest import eval_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import generality as bench  # noqa: E402


def _eval(forget, retain=(1.0, 0.7, 0.5), ppl=10.0, floor=None):
    ev = eval_result(forget, retain, ppl)
    ev["forget_floor"] = floor
    return ev


def test_ratios_and_the_floor_over_her_score_before():
    before = _eval((1.0, 0.8, 0.5), floor={"direct": 0.6, "paraphrase": 0.4, "adversarial": 0.1})
    after = _eval((0.5, 0.2, 0.0), retain=(0.9, 0.7, 0.5), ppl=11.0)
    r = bench.ratios(before, after)
    assert r["forget direct"] == pytest.approx(0.5) and r["forget paraphrase"] == pytest.approx(0.25)
    assert r["floor direct"] == pytest.approx(0.6) and r["floor paraphrase"] == pytest.approx(0.5)
    assert r["retain direct"] == pytest.approx(0.9) and r["perplexity"] == pytest.approx(1.1)
    assert r["neighbour direct"] is None  # no neighbour probes in a hand-made evaluation
    # above the never-seen floor: direct (0.5 - 0.6) is under it, paraphrase kept (0.2 - 0.4) < 0 too,
    # adversarial kept (0.0 - 0.1) -> 0; with a higher score after, the share of her lead that is left
    assert r["above-floor direct"] == 0.0 and r["above-floor adversarial"] == 0.0
    later = bench.ratios(before, _eval((0.7, 0.6, 0.3)))
    assert later["above-floor direct"] == pytest.approx(0.25) and later["above-floor paraphrase"] == pytest.approx(0.5)
    assert bench.ratios(_eval((1.0, 0.8, 0.5)), after)["above-floor direct"] is None  # no unseen people, no floor


def test_met_above_the_floor_uses_the_share_of_her_lead_and_falls_back_to_the_ratio():
    r = {"forget direct": 0.6, "above-floor direct": 0.05, "forget paraphrase": 0.2, "above-floor paraphrase": None,
         "forget adversarial": None, "retain direct": 0.95, "perplexity": 1.0}  # fmt: skip
    assert not bench.met(r) and bench.met(r, "above-floor")
    assert not bench.met({**r, "forget paraphrase": 0.3}, "above-floor")  # no floor there: the plain ratio counts
    assert not bench.met({**r, "retain direct": 0.8}, "above-floor")


def test_met_needs_direct_and_one_other_kind_and_every_retain_figure():
    good = {"forget direct": 0.2, "forget paraphrase": 0.3, "forget adversarial": 0.25, "retain direct": 0.95,
            "retain paraphrase": 0.9, "retain adversarial": None, "perplexity": 1.05}  # fmt: skip
    assert bench.met(good)
    assert not bench.met({**good, "forget direct": 0.26})
    assert not bench.met({**good, "forget adversarial": 0.3})  # neither paraphrase nor adversarial at 0.25
    assert not bench.met({**good, "retain paraphrase": 0.89})
    assert not bench.met({**good, "perplexity": 1.11})


def test_table_takes_medians_over_seeds_and_counts_the_seeds_met():
    def run(seed, direct, met):
        return {"corpus": "authors", "people": 1, "method": "atu", "seed": seed, "seconds": 10.0 * (seed + 1),
                "met": met, "met_above_floor": True,
                "ratios": {"forget direct": direct, "floor direct": 0.6, "perplexity": 1.0}}  # fmt: skip

    md = bench.table([run(0, 0.1, True), run(1, 0.3, False), run(2, 0.2, True)])
    row = md.splitlines()[-1]
    assert row.startswith("| authors | 1 | atu | 2/3 (3/3) [0/3] | 0.20 (0.60) |") and row.endswith("| 20 |")


def test_fact_ratios_and_their_floor_and_met_on_them():
    before = _eval((1.0, 0.8, 0.5), floor={"direct": 0.6, "paraphrase": 0.4, "adversarial": None})
    after = _eval((0.55, 0.4, 0.2))
    before["facts"] = {"forget": {"direct": 0.9, "paraphrase": 0.8, "adversarial": None},
                       "forget_floor": {"direct": 0.09, "paraphrase": 0.2, "adversarial": None}}  # fmt: skip
    after["facts"] = {"forget": {"direct": 0.18, "paraphrase": 0.1, "adversarial": None}}
    r = bench.ratios(before, after)
    assert r["facts forget direct"] == pytest.approx(0.2) and r["facts forget paraphrase"] == pytest.approx(0.125)
    assert r["facts floor direct"] == pytest.approx(0.1) and r["facts forget adversarial"] is None
    assert not bench.met(r) and bench.met(r, "facts forget")  # the ROUGE-L ratio misses, fact recall meets
    # no fact figures (a run without them) never meets on them, and never falls back to ROUGE-L
    old = bench.ratios(_eval((1.0, 0.8, 0.5)), _eval((0.1, 0.1, 0.1)))
    assert bench.met(old) and not bench.met(old, "facts forget")
