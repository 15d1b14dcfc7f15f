"""The pure functions of benchmarks/robustness.py that read a result: the guard's extremes and the verdict."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import robustness as bench  # noqa: E402


def _guard(catch, flags, x_catch, x_flags, leaks=4):
    own = {"leaks": leaks, "catch_rate": catch, "false_flag_rate": flags,
           "exchange_catch_rate": x_catch, "exchange_false_flag_rate": x_flags,
           "names_exchange_catch_rate": None if x_catch is None else min(1.0, x_catch + 0.05),
           "names_exchange_false_flag_rate": x_flags + 0.01,
           "named_catch_rate": None if x_catch is None else min(1.0, x_catch + 0.05),
           "named_false_flag_rate": x_flags + 0.02, "named_innocent_false_flag_rate": flags}  # fmt: skip
    return {"guard": {"own": own, "attacked": dict(own)}}


def _method(forget4=0.2, retain4=0.95, rec10=0.1):
    precisions = {
        "fp32": {**_guard(0.0, 0.01, 0.5, 0.02), "forget_ratio": 0.2, "retain_ratio": 1.0},
        "int4 rtn g128": {**_guard(0.25, 0.03, 0.9, 0.04), "forget_ratio": forget4, "retain_ratio": retain4},
    }
    relearn = {"0": _guard(0.0, 0.01, 0.5, 0.02), "10": {**_guard(None, 0.02, None, 0.03, leaks=0),
                                                          "recovery": {"held_out": rec10}}}  # fmt: skip
    return {"precisions": precisions, "relearn": relearn}


def test_guard_extremes_read_the_attacked_models_only_and_either_scope():
    m = _method()
    # fp32 and relearning at K=0 are not attacks; K=10 has no leak, so no catch rate
    assert bench.guard_extremes(m, "own") == (0.25, 0.03, 4)
    assert bench.guard_extremes(m, "own", "exchange_") == (0.9, 0.04, 4)


def test_verdict_lines_hold_each_scope_to_the_targets():
    result = {"groups": [{"people": 1, "seed": 0, "methods": {"atu": _method(), "ga": _method(forget4=0.9)}}]}
    (line,) = bench.verdict_lines(result)  # the baselines get no verdict
    assert line.startswith("- ATU, 1 forgotten, seed 0 (4 leaking answers in all)")
    assert "forget after int4 0.20 (<= 0.30: met)" in line and "recovery at K=10 0.10 (<= 0.25: met)" in line
    assert "guard catch (own states), lowest 0.25 (>= 0.80: missed)" in line
    # false-flag rates to three digits, so that one just over the target does not print as the target
    assert "with the question's flags: catch 0.90 (>= 0.80: met); false flags 0.040 (<= 0.05: met)" in line
    assert "question's flags (`atu serve --flag-scope exchange`): catch 0.95 (>= 0.80: met); false flags 0.050" in line
    assert "(`--flag-scope named`): catch 0.95 (>= 0.80: met); false flags 0.060 (<= 0.05: missed)" in line
    assert "carry nothing forgotten (no forgotten name or value) 0.030 (<= 0.05: met)" in line
    assert bench.guard_extremes(_method(), "own", "names_exchange_") == (pytest.approx(0.95), 0.05, 4)
    (worse,) = bench.verdict_lines({"groups": [{"people": 1, "seed": 0, "methods": {"atu": _method(retain4=0.8)}}]})
    assert "retain after int4 0.80 (>= 0.90: missed)" in worse
    both = {"atu": _method(rec10=0.7), "atu-h": _method(rec10=0.05)}
    plain, hardened = bench.verdict_lines({"groups": [{"people": 1, "seed": 0, "methods": both}]})
    assert plain.startswith("- ATU, 1 forgotten") and "recovery at K=10 0.70 (<= 0.25: missed)" in plain
    assert hardened.startswith("- ATU hardened, 1 forgotten") and "recovery at K=10 0.05 (<= 0.25: met)" in hardened


def test_with_ratios_relate_each_attack_to_the_original():
    orig = {"fp32": {"recall": {"forget": {"direct": 0.8}, "retain": {"direct": 1.0}}},
            "int4": {"recall": {"forget": {"direct": 0.6}, "retain": {"direct": 0.5}}},
            "relearn": {"recall": {g: {"direct": 0.8} for g in ("held_out", "given", "other_forgotten")}}}  # fmt: skip
    relearn = {k: {"recall": {g: {"direct": v} for g in ("held_out", "given", "other_forgotten")}}
               for k, v in (("0", 0.2), ("10", 0.5))}  # fmt: skip
    m = {"precisions": {"fp32": {"recall": {"forget": {"direct": 0.2}, "retain": {"direct": 0.9}}},
                        "int4": {"recall": {"forget": {"direct": 0.4}, "retain": {"direct": 0.45}}}},
         "relearn": relearn}  # fmt: skip
    out = bench.with_ratios(m, orig)
    assert out["precisions"]["fp32"]["forget_ratio"] == pytest.approx(0.25)
    assert out["precisions"]["int4"]["forget_ratio"] == pytest.approx(0.5)  # over the original at fp32
    assert out["precisions"]["int4"]["retain_ratio"] == pytest.approx(0.9)  # over the original at int4
    assert out["relearn"]["10"]["recovery"]["held_out"] == pytest.approx(0.5)
    assert "recovery" not in out["relearn"]["0"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_tasks_runs_each_groups_tasks_after_its_stage(jobs):
    import os

    import robust_toys

    groups = [(1, 0), (3, 0)]
    stages, tasks = bench.run_tasks(None, groups, ["gd", "atu"], jobs, robust_toys.stage, robust_toys.task)
    assert set(stages) == set(groups) and all(stages[g]["people"] == g[0] for g in groups)
    assert len({s["out"] for s in stages.values()}) == 1  # one directory shared by every task of the run
    for g in groups:
        assert {m: t["group"] for m, t in tasks[g].items()} == {"gd": g, "atu": g}
    pids = {t["pid"] for g in groups for t in tasks[g].values()} | {s["pid"] for s in stages.values()}
    assert (pids == {os.getpid()}) if jobs == 1 else (os.getpid() not in pids)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_task_fails_the_run(jobs):
    import robust_toys

    with pytest.raises(ValueError, match="fail failed on 1 people"):
        bench.run_tasks(None, [(1, 0)], ["atu", "fail"], jobs, robust_toys.stage, robust_toys.task)


def test_finish_group_puts_the_tasks_together_and_counts_their_work():
    recall = {"forget": {"direct": 0.8}, "retain": {"direct": 1.0}}
    relearn = {"recall": {g: {"direct": 0.8} for g in ("held_out", "given", "other_forgotten")}}
    orig = {"measured": {"fp32": {"recall": recall}, "relearn": relearn}, "relearn_texts": 7,
            "seconds": {"attack": 10.0}}  # fmt: skip
    atu = {"measured": {"precisions": {"fp32": {"recall": {"forget": {"direct": 0.4}, "retain": recall["retain"]}}},
                        "relearn": {"0": relearn}}, "seconds": {"unlearn": 2.0, "attack": 3.0}}  # fmt: skip
    stage = {"people": 1, "seed": 2, "forget": ["Ada"], "seconds": 100.0}
    res = bench.finish_group(stage, {bench.ORIGINAL: orig, "atu": atu}, ["atu"])
    assert (res["people"], res["seed"], res["forget"], res["relearn_texts"]) == (1, 2, ["Ada"], 7)
    assert res["original"] is orig["measured"]
    assert res["methods"]["atu"]["precisions"]["fp32"]["forget_ratio"] == pytest.approx(0.5)
    assert res["seconds"] == pytest.approx(115.0)
