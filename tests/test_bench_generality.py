"""The pure functions of benchmarks/generality.py, on hand-made evaluations."""

import json
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


def test_claim_holds_fails_or_has_no_equal_retain_point():
    assert bench.claim((0.20, 0.95), (0.30, 0.95)) == "holds"
    assert bench.claim((0.31, 0.95), (0.30, 0.96)) == "holds"  # within EQUAL on both
    assert bench.claim((0.40, 0.95), (0.20, 0.95)).startswith("fails")
    assert bench.claim((0.40, 0.95), (0.20, 0.80)) == "no equal-retain point: the baseline forgets more but keeps less"
    assert bench.claim((0.20, 0.80), (0.40, 0.95)) == "no equal-retain point: ATU forgets more but keeps less"
    assert bench.claim((None, 0.9), (0.2, 0.9)) == "not measured"


def test_claims_compare_medians_of_the_mean_forget_and_lowest_retain(tmp_path):
    def run(method, seed, forget, retain, settings=None):
        return {"corpus": "bios", "people": 1, "method": method, "seed": seed, "settings": settings or {"a": 1},
                "ratios": {"forget direct": forget, "forget paraphrase": forget / 2, "forget adversarial": None,
                           "retain direct": 1.0, "retain paraphrase": retain}}  # fmt: skip

    runs = [run("atu", 0, 0.4, 0.95), run("atu", 1, 0.2, 0.97), run("atu", 2, 0.32, 0.99), run("ga", 0, 0.8, 0.96)]
    line = bench.claims(runs).splitlines()[-1]
    # ATU: mean forget 0.3, 0.15, 0.24 -> median 0.24; lowest retain median 0.97. GA: 0.6 / 0.96
    assert line == "| bios | 1 | ga | 0.24 / 0.97 | 0.60 / 0.96 | 3 / 1 | holds |"
    # combining files keeps only the runs made at the given settings, a later file's run replacing an earlier one
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"runs": runs[:2] + [run("npo", 0, 0.1, 0.9, {"a": 2})]}))
    b.write_text(json.dumps({"runs": [run("atu", 1, 0.9, 0.9)]}))
    got = bench.combine([a, b], {"a": 1})
    assert sorted((r["method"], r["seed"], r["ratios"]["forget direct"]) for r in got) == [
        ("atu", 0, 0.4),
        ("atu", 1, 0.9),
    ]
    with pytest.raises(SystemExit, match="no run"):
        bench.combine([a], {"a": 3})
