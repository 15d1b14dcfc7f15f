"""The pipeline's figures over unlearning seeds: each criterion per seed, and in how many seeds it is met.

One run says little on the embedded world: which facts survive moves with the order of the forget batches
(`unlearn.seed`), and the figures sit within an answer or two of their targets. This runs a config once per seed,
exactly as `atu run CONFIG --no-export` would, and tabulates every criterion `atu run` prints (forget and retain
recall ratios, perplexity, fluency, and the driving predictor's cosines).

    python benchmarks/seeds.py                       # configs/world.yaml and configs/world_three.yaml, seeds 0 1 2
    python benchmarks/seeds.py --config configs/world_three.yaml --set unlearn.retain_weight=0.75
    python benchmarks/seeds.py --quick               # the tiny world, two seeds: a check that the script runs

Runs go to runs/seeds/ (a killed benchmark resumes each run from its last stage). Writes DIR/seeds.json and
DIR/seeds.md (default DIR: results; --quick: results/quick). Every figure is measured on this run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import yaml

from atu import __version__, cache
from atu.evaluation.metrics import similarity_criteria, unlearning_criteria
from atu.run import run
from atu.run_config import RunConfig, demo_settings

DEFAULT_CONFIGS = ["configs/world.yaml", "configs/world_three.yaml"]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``raw`` (a run config as a dict) with each ``dotted.key=value`` set; the value is read as YAML."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes dotted.key=value, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def criteria(summary: dict) -> list[dict]:
    """Every criterion `atu run` prints for ``summary`` (its eval.json), in print order."""
    rows = []
    if summary.get("before") and summary.get("after"):
        rows += unlearning_criteria(summary["before"], summary["after"])
    rows += similarity_criteria(summary.get("similarity", {}), summary["final_thresholds"], summary["forget"])
    return rows


def aggregate(per_seed: dict[int, list[dict]]) -> list[dict]:
    """One row per criterion: its target, its value in each seed, and in how many seeds it is met."""
    rows: dict[str, dict] = {}
    for seed, crit in per_seed.items():
        for c in crit:
            row = rows.setdefault(c["name"], {"name": c["name"], "target": c["target"], "values": {}, "met": 0})
            row["values"][seed] = c["value"]
            row["met"] += bool(c["met"])
    for row in rows.values():
        row["seeds"] = len(row["values"])
    return list(rows.values())


def all_met(per_seed: dict[int, list[dict]]) -> dict[int, bool]:
    return {seed: all(c["met"] for c in crit) for seed, crit in per_seed.items()}


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# The pipeline's figures over unlearning seeds", ""]
    for entry in result["configs"]:
        seeds = entry["seeds"]
        lines += [f"## {entry['name']}", ""]
        if entry["overrides"]:
            lines += ["Overrides: " + ", ".join(f"`{o}`" for o in entry["overrides"]), ""]
        lines += [
            "| criterion | target | " + " | ".join(f"seed {s}" for s in seeds) + " | met in |",
            "|---|---|" + "---:|" * len(seeds) + "---:|",
        ]
        for row in entry["criteria"]:
            cells = [f"{row['values'][s]:.3f}" if s in row["values"] else "-" for s in seeds]
            met_in = f"{row['met']}/{row['seeds']}"
            lines.append(f"| {row['name']} | {row['target']} | " + " | ".join(cells) + f" | {met_in} |")
        met = entry["all_met"]
        lines += [
            "",
            f"Every criterion met in {sum(met.values())} of {len(met)} seeds"
            + (f" (seeds {', '.join(str(s) for s, ok in met.items() if ok)})" if any(met.values()) else "")
            + f"; {entry['seconds']:.0f} s in all.",
            "",
        ]
    path.write_text("\n".join(lines))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", help="run config (repeatable); default: the two world configs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="dotted.key=value (repeatable)")
    ap.add_argument("--quick", action="store_true", help="the tiny world, seeds 0 and 1")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--runs", type=Path, default=Path("runs/seeds"), help="where the runs are kept")
    args = ap.parse_args(argv)
    out_dir = args.out_dir or (Path("results/quick") if args.quick else Path("results"))
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per model load otherwise

    if args.quick:
        from atu.world.build import build_world
        from atu.world.config import WorldConfig

        first = build_world(WorldConfig.tiny()).concepts().names()[:1]
        configs = [("tiny world, one person", {**demo_settings(1, tiny=True), "data": {"forget": first}, "out": "-"})]
        seeds = [0, 1]
    else:
        configs = [(c, RunConfig.load(c).to_dict()) for c in (args.config or DEFAULT_CONFIGS)]
        seeds = args.seeds
    result = {"atu": __version__, "python": platform.python_version(), "configs": []}
    for name, raw in configs:
        raw = apply_overrides(raw, args.overrides)
        t0 = time.time()
        per_seed, summaries = {}, {}
        for seed in seeds:
            cfg = RunConfig.from_dict(apply_overrides(raw, [f"unlearn.seed={seed}"]), name)
            cfg.out = str(args.runs / cache.config_key({k: v for k, v in cfg.to_dict().items() if k != "out"}))
            print(f"{name}, seed {seed}: {cfg.out}", flush=True)
            summary = run(cfg, export=False, progress=False)
            per_seed[seed], summaries[seed] = criteria(summary), summary
            missed = [c["name"] for c in per_seed[seed] if not c["met"]]
            print(f"  {'all met' if not missed else 'missed: ' + '; '.join(missed)}  ({summary['seconds']:.0f} s)")
        result["configs"].append(
            {
                "name": name,
                "overrides": args.overrides,
                "seeds": seeds,
                "criteria": aggregate(per_seed),
                "all_met": all_met(per_seed),
                "seconds": time.time() - t0,
                "runs": {seed: s.get("seconds") for seed, s in summaries.items()},
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "seeds.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, out_dir / "seeds.md")
    print((out_dir / "seeds.md").read_text())
    print(f"wrote {out_dir / 'seeds.json'} and {out_dir / 'seeds.md'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
