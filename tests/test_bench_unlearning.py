"""The pure report functions of benchmarks/unlearning.py, on hand-made rows."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import unlearning as bench  # noqa: E402


def _row(method, retain, paraphrase, adversarial, chosen=False, people=1, steps=240):
    kinds = ("direct", "paraphrase", "adversarial")
    return {
        "method": method,
        "strength": f"{method} {steps}",
        "people": people,
        "steps": steps,
        "chosen": chosen,
        "eval": {"forget": dict(zip(kinds, (0.2, paraphrase, adversarial))), "retain": dict.fromkeys(kinds, retain)},
    }


def test_claim_holds_only_against_points_at_equal_or_better_retain():
    rows = [
        _row("atu", 0.74, 0.19, 0.25, chosen=True),
        _row("ga", 0.75, 0.20, 0.25),  # comparable, forgets less or equal on both: fine
        _row("npo", 0.50, 0.00, 0.00),  # forgets more but broke retain: not comparable
        _row("gd", 0.80, 0.00, 0.00),  # gd is not part of the claim
        _row("ga", 0.10, 0.00, 0.00, people=3),  # another group
    ]
    got = bench.claim_check(rows, 1)
    assert got["holds"] is True
    assert [c["method"] for c in got["compared"]] == ["ga"]

    rows.append(_row("npo", 0.725, 0.10, 0.30))  # within the tolerance (0.02) below ATU's retain, forgets more
    got = bench.claim_check(rows, 1)
    assert got["holds"] is False
    assert "npo npo 240 on paraphrase" in got["why"]


def test_claim_is_untested_without_a_chosen_atu_row_or_a_comparable_point():
    assert bench.claim_check([_row("atu", 0.7, 0.1, 0.1)], 1)["holds"] is None
    got = bench.claim_check([_row("atu", 0.7, 0.1, 0.1, chosen=True), _row("ga", 0.1, 0.0, 0.0)], 1)
    assert got["holds"] is None and "no ga or npo point" in got["why"]


def test_baselines_get_evenly_spread_atu_step_counts_and_always_the_last():
    assert bench.FULL.atu_config(["X"], "out", "cpu").unlearn.taus is None  # the demo's placed schedule
    assert bench.FULL.cut_steps([40, 80, 120, 160, 200, 240]) == [120, 160, 240]
    assert bench.FULL.cut_steps([40, 80]) == [40, 80]
    assert bench.FULL.cut_steps([40]) == [40] and bench.FULL.cut_steps([]) == []
