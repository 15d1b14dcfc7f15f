"""The schedule on the tiny world: thresholds placed from the data, the retain budget's retry at half the rate, the
baselines run through the same stages, and the forgetting verdict in the summary."""

import json

import pytest

from atu.run import run
from atu.run_config import RunConfig

pytestmark = pytest.mark.slow


def _config(out, tiny_world, **unlearn):
    raw = {
        "model": "world:tiny",
        "data": {"forget": tiny_world.concepts().names()[:1]},
        "align": {"epochs": 3, "realign_epochs": 1, "window": 4},
        "unlearn": {"stages": 2, "steps_per_stage": 3, **unlearn},
        "out": str(out),
    }
    return RunConfig.from_dict(raw)


def _events(run_dir, name):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def test_placed_schedule_steps_down_from_the_forget_texts_to_the_retain_texts(tiny_world, tmp_path):
    summary = run(_config(tmp_path, tiny_world, target="name+contrast"), progress=False, export=False)
    (planned,) = _events(tmp_path, "planned")
    assert planned["schedule"] == "placed" and planned["target_kinds"] == ["name", "contrast"]
    assert len(planned["start"]) == len(planned["floor"]) == 2  # one row per kind of the one concept
    stages = summary["stages"]
    done = _events(tmp_path, "stage_done")
    assert len(done) == len(stages)
    for row, idle in enumerate(planned["idle"]):
        ths = [d["thresholds"][row] for d in done]
        if idle:  # stays at its start
            assert ths == pytest.approx([planned["start"][row]] * len(ths), abs=1e-4)
        else:  # falls evenly to the floor, which the last stage reaches
            assert ths == sorted(ths, reverse=True)
            if len(done) == 2:
                assert ths[-1] == pytest.approx(planned["floor"][row], abs=1e-4)
    if done:
        assert summary["final_thresholds"] == pytest.approx(done[-1]["thresholds"][:1])
        assert done[-1]["heldout_forget_ppl_ratio"] is not None  # the tiny world has held-out texts about her
    verdict = summary["forgetting"]
    assert verdict["schedule"] == "placed" and isinstance(verdict["failed"], bool) and verdict["why"]


def test_a_stage_over_budget_is_retried_at_half_the_rate_then_the_schedule_stops(tiny_world, tmp_path):
    cfg = _config(tmp_path, tiny_world, algorithm="ga", baseline_lr=1e-2, retain_budget=1e-6, budget_retries=1)
    summary = run(cfg, progress=False, export=False)
    tries = [e["lr"] for e in _events(tmp_path, "validated")]
    assert tries == pytest.approx([1e-2, 5e-3])  # the first stage, then again at half the rate
    assert summary["stages"] == [] and "nothing unlearned" in summary["stop_reason"]
    assert summary["forgetting"]["failed"] and "unchanged" in summary["forgetting"]["why"]
    assert summary["forgetting"]["schedule"] == "baseline"
    # undone: the model evaluated after is the model before
    assert summary["after"]["retain_perplexity"] == pytest.approx(summary["before"]["retain_perplexity"], rel=1e-4)


def test_baselines_run_through_the_same_stages(tiny_world, tmp_path):
    cfg = _config(tmp_path, tiny_world, algorithm="npo", baseline_lr=1e-3, retain_budget=10.0)
    summary = run(cfg, progress=False, export=False)
    assert summary["forgetting"]["schedule"] == "baseline"
    assert [s["stage"] for s in summary["stages"]] == [0, 1]  # within a budget this loose, both stages are kept
    assert summary["after"]["retain_perplexity"] != summary["before"]["retain_perplexity"]  # npo changed the model


def test_past_the_floor_the_schedule_stops_after_two_stages_that_forget_no_more(tiny_world, tmp_path, monkeypatch):
    import atu.plan

    # stage 1 is the floor; stage 2 forgets no more than it, stage 3 a little more (under 5%): the schedule stops
    # after stage 3 and keeps it
    scores = {0: 1.0, 1: 2.0, 2: 1.5, 3: 2.05}
    monkeypatch.setattr(atu.plan, "specific_forgetting", lambda record: scores[record["stage"]])
    cfg = _config(tmp_path, tiny_world, target="name", lr=1.0, retain_budget=10.0)
    summary = run(cfg, progress=False, export=False)
    assert [s["stage"] for s in summary["stages"]] == [0, 1, 2, 3]
    assert "levelled off" in summary["stop_reason"] and "since stage 1" in summary["stop_reason"]


def test_a_placed_stage_over_budget_is_retried_half_the_step_down(tiny_world, tmp_path, monkeypatch):
    from atu.progress import HeldOut

    # retain perplexity: 10 before, 20 after the first try (over the budget), 10.5 after every later one
    values = iter([10.0, 20.0])
    monkeypatch.setattr(HeldOut, "retain_perplexity", lambda self, model: next(values, 10.5))
    cfg = _config(tmp_path, tiny_world, target="name", lr=1.0, retain_budget=0.1, budget_retries=1)
    summary = run(cfg, progress=False, export=False)
    (planned,) = _events(tmp_path, "planned")
    tries = _events(tmp_path, "validated")
    assert [t["stage"] for t in tries[:2]] == [0, 0] and tries[0]["rise"] == pytest.approx(1.0)
    first, second = tries[0]["thresholds"][0], tries[1]["thresholds"][0]
    assert second == pytest.approx((planned["start"][0] + first) / 2, abs=1e-3)  # halfway from the start
    assert tries[1]["lr"] == tries[0]["lr"] == 1.0  # at the same rate
    assert summary["stages"][0]["refines"] == 1  # kept at the half step, and the record says so
    # the plan from there on is in half steps: the next stage is where the first try was
    assert tries[2]["thresholds"][0] == pytest.approx(first, abs=1e-4)
