"""The pure functions of benchmarks/seeds.py, on hand-made summaries."""

import sys
from pathlib import Path

import pytest
from conftest import eval_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import seeds as bench  # noqa: E402


def _summary(paraphrase_after, retain_cos_after):
    return {
        "forget": ["A"],
        "final_thresholds": [0.4],
        "before": eval_result((1.0, 0.8, 0.6)),
        "after": eval_result((0.2, paraphrase_after, 0.1)),
        "similarity": {
            "before": {"forget": [0.5], "retain": [0.3]},
            "after_driving_predictor": {"forget": [0.25], "retain": [retain_cos_after]},
        },
    }


def test_criteria_cover_the_cli_lines_and_aggregate_over_seeds():
    per_seed = {0: bench.criteria(_summary(0.16, 0.25)), 1: bench.criteria(_summary(0.24, 0.18))}
    names = [c["name"] for c in per_seed[0]]
    assert names[:3] == ["forget direct / before", "forget paraphrase / before", "forget adversarial / before"]
    assert "retain perplexity / before" in names and names[-2:] == ["forget cosine (A)", "retain cosine change (A)"]
    rows = {r["name"]: r for r in bench.aggregate(per_seed)}
    para = rows["forget paraphrase / before"]
    assert para["values"] == pytest.approx({0: 0.2, 1: 0.3}) and para["met"] == 1 and para["seeds"] == 2
    assert rows["retain cosine change (A)"]["met"] == 1  # -0.05 within 0.1; -0.12 not
    assert bench.all_met(per_seed) == {0: True, 1: False}


def test_overrides_set_nested_keys_as_yaml_values_without_touching_the_input():
    raw = {"model": "world", "unlearn": {"lr": 0.3}}
    out = bench.apply_overrides(raw, ["unlearn.retain_weight=0.75", "unlearn.taus=[0.5, 0.4]", "data.mentions=false"])
    assert out["unlearn"] == {"lr": 0.3, "retain_weight": 0.75, "taus": [0.5, 0.4]}
    assert out["data"] == {"mentions": False} and raw == {"model": "world", "unlearn": {"lr": 0.3}}
    with pytest.raises(SystemExit, match="dotted.key=value"):
        bench.apply_overrides(raw, ["unlearn.lr"])


def test_markdown_lists_every_criterion_per_seed(tmp_path):
    per_seed = {0: bench.criteria(_summary(0.16, 0.25)), 1: bench.criteria(_summary(0.24, 0.18))}
    result = {
        "configs": [
            {"name": "c.yaml", "overrides": [], "seeds": [0, 1], "criteria": bench.aggregate(per_seed),
             "all_met": bench.all_met(per_seed), "seconds": 12.0}
        ]
    }  # fmt: skip
    bench.write_markdown(result, tmp_path / "s.md")
    text = (tmp_path / "s.md").read_text()
    assert "| forget paraphrase / before | <= 0.25 | 0.200 | 0.300 | 1/2 |" in text
    assert "Every criterion met in 1 of 2 seeds (seeds 0)" in text
