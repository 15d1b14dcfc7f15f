"""Unlearning quality: ATU against gradient ascent (ga), gradient difference (gd) and NPO on the embedded world.

ATU runs at its chosen setting: exactly what `atu demo` and configs/world.yaml / configs/world_three.yaml run
(`atu.run_config.demo_settings`). Every method gets the same data (forget texts: the forgotten people's corpus records
and the texts naming them, as ATU's `data.mentions`; gd's retain texts: all the others), the same parameter budget
(decoder layers 0..L-1 fully trained, L = ATU's hook layer) and the same number of optimizer steps.

Strengths come from one training run per method, scored part way:
- ATU: the schedule scored after every stage it kept. A schedule that stops after that stage is the same
  computation (the stages run in order, each from the model the previous one left), so one run gives every cut;
  the last stage kept is the chosen setting.
- Baselines: the model after the same number of optimizer steps as ATU at `Plan.baseline_cuts` of those cuts,
  evenly spread and always the last, at the Adam learning rate(s) of `Plan.baseline_lrs`.
Every model is scored by `atu.evaluation.evaluate.evaluate_model` on the inputs `atu run` uses. Leakage AUROC needs
ATU's predictor, so the baselines report none. Seconds: the wall time to reach that strength (loading, training and,
for ATU, the evaluation before and the alignment), scoring excluded.

    python benchmarks/unlearning.py                  # the world: 1 then 3 people forgotten (about 23 min, 2 CPU cores)
    python benchmarks/unlearning.py --quick          # the tiny world (under a minute)
    python benchmarks/unlearning.py --out-dir DIR    # default: results

Writes DIR/unlearning.json, DIR/unlearning.md (a markdown table) and DIR/unlearning.png (forget recall against
retain recall). Every figure is measured on this run only.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from atu import __version__
from atu.baselines import BaselineConfig, run_baseline
from atu.concept_reader import ConceptReader
from atu.evaluation.evaluate import evaluate_model
from atu.evaluation.metrics import unlearning_criteria
from atu.formats import PROBE_KINDS
from atu.loading import load_lm
from atu.run import run as run_atu
from atu.run_config import RunConfig, demo_settings
from atu.run_data import RunData, load_run_data
from atu.world.build import WORLD_FILES, BuiltWorld, build_world
from atu.world.config import WorldConfig

RETAIN_TOLERANCE = 0.02  # "an equal retain score": a baseline point whose retain recall is at most this much lower


@dataclass(frozen=True)
class Plan:
    """What one invocation measures."""

    tiny: bool  # the tiny world (--quick) or the default one
    people: tuple[int, ...]  # forget the first n people of concepts.yaml, for each n
    baseline_lrs: dict[str, tuple[float, ...]]  # per baseline, its Adam learning rates (one run each)
    baseline_cuts: int = 3  # ATU cuts whose step counts the baselines are scored at (evenly spread, the last kept)

    def world(self) -> WorldConfig:
        return WorldConfig.tiny() if self.tiny else WorldConfig()

    def atu_config(self, forget: list[str], out: str, device: str) -> RunConfig:
        raw = {**demo_settings(len(forget), self.tiny), "data": {"forget": forget}, "out": out, "device": device}
        return RunConfig.from_dict(raw, "benchmark config")

    def cut_steps(self, atu_steps: list[int]) -> list[int]:
        """Of ATU's optimizer steps at the end of each stage it kept (rising), the ``baseline_cuts`` the baselines
        are scored at: evenly spread, the last always among them."""
        if not atu_steps:
            return []
        n = len(atu_steps)
        picks = {round((n - 1) * (k + 1) / self.baseline_cuts) for k in range(self.baseline_cuts)}
        return [atu_steps[i] for i in sorted(picks)]


# Learning rates, measured with this script's scoring at hook layer 3 (forget recall direct/paraphrase/adversarial,
# retain recall mean of kinds; before: 1.0/.89/.57 and .75 for one person, 1.0/.82/.57 and .74 for three):
# - ga 3e-5: one person, 160 steps: .12/.08/.04, retain .68; three people: collapsed from 320 steps (retain 0).
# - ga 1e-5: one person, 200 steps: .20/.11/.14, retain .745; three people, 320 steps: .68/.59/.28, retain .744,
#   400 steps: retain .58.
# - npo 1e-4 and 3e-5: retain .59 from 120 steps on, with one person (three: .47 and .67).
# - npo 1e-5: one person, 160 steps: nothing forgotten, retain .73; 240 steps: .20/.06/.14, retain .68.
# - gd 1e-4: everything forgotten by 160 steps, retain kept (.75 / .76).
# Each baseline runs at the smallest of those, the one that kept retain recall longest; its strengths are ATU's step
# counts. More learning rates would not fit in 30 minutes on 2 CPU cores: three people take 480 steps a run.
FULL = Plan(
    tiny=False,
    people=(1, 3),
    baseline_lrs={"ga": (1e-5,), "gd": (1e-4,), "npo": (1e-5,)},
)
# --quick: two people of the tiny world's four, not three, so that held-out texts of a retained person remain.
QUICK = Plan(tiny=True, people=(1, 2), baseline_lrs={"ga": (3e-5,), "gd": (1e-4,), "npo": (3e-4,)}, baseline_cuts=2)


# ------------------------------------------------------------------------------------------- one run each


def _world_data(plan: Plan, built: BuiltWorld, forget: list[str]) -> RunData:
    cfg = RunConfig.from_dict({"model": "world:tiny" if plan.tiny else "world", "data": {"forget": forget}})
    return load_run_data(cfg, {k: str(built.path(v)) for k, v in WORLD_FILES.items()})


def _evaluate(model, tokenizer, data: RunData, guard: ConceptReader | None = None) -> dict:
    """`evaluate_model` on exactly the inputs `atu.run.run` gives it."""
    ev = evaluate_model(model, tokenizer, data.eval_inputs().without_floor(), guard=guard)
    return {k: v for k, v in ev.items() if k != "answers"}


class _Clock:
    """Wall time since start, less the time spent scoring models."""

    def __init__(self) -> None:
        self.start, self.scoring = time.perf_counter(), 0.0

    def training(self) -> float:
        return time.perf_counter() - self.start - self.scoring

    def score(self, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.scoring += time.perf_counter() - t


def atu_rows(plan: Plan, data: RunData, tokenizer, device: str) -> tuple[list[dict], dict]:
    """One ATU run at its chosen setting, scored after each cut stage: (rows, the run's summary)."""
    forget = list(data.forget)
    rows: list[dict] = []
    clock = _Clock()

    steps = [0]

    def on_stage(record, *, model, predictor, concept_vectors, hook_layer) -> None:
        steps[0] += record["steps"]
        seconds = clock.training()
        ev = clock.score(
            _evaluate, model, tokenizer, data, guard=ConceptReader(predictor, hook_layer, concept_vectors)
        )
        rows.append({"stage": record["stage"], "tau": record["tau"], "steps": steps[0], "seconds": round(seconds, 1),
                     "eval": ev})  # fmt: skip

    # A fresh run directory: `run` resumes from a checkpoint it finds there.
    with tempfile.TemporaryDirectory(prefix="atu_bench_") as out:
        cfg = plan.atu_config(forget, out, device)
        summary = run_atu(cfg, progress=False, export=False, on_stage=on_stage)
    out_rows = [
        {
            "method": "atu",
            "strength": f"stage {r['stage']} (tau {r['tau']:.2f})",
            "people": len(forget),
            "steps": r["steps"],
            "seconds": r["seconds"],
            "chosen": i == len(rows) - 1,
            "eval": r["eval"],
        }
        for i, r in enumerate(rows)
    ]
    run_info = {
        "method": "atu",
        "people": len(forget),
        "config": cfg.to_dict(),
        "seconds": round(time.perf_counter() - clock.start, 1),
        "stop_reason": summary["stop_reason"],
        "hook_layer": summary["hook_layer"],
        "align": summary["align"],
        "stage_seconds": [s["stage_seconds"] for s in summary["stages"]],
        "before_leakage_auroc": summary["before"]["leakage_auroc"],
    }
    return out_rows, run_info


def baseline_rows(
    built: BuiltWorld, data: RunData, method: str, lr: float, hook_layer: int, steps: list[int], device: str
) -> tuple[list[dict], dict]:
    """One baseline run for max(steps) steps, scored after each step count in ``steps``: (rows, run info)."""
    cfg = BaselineConfig(method=method, hook_layer=hook_layer, steps=max(steps), lr=lr)
    at = set(steps)
    rows: list[dict] = []
    clock = _Clock()
    model, tokenizer = load_lm(built.model_dir, device=device)

    def on_step(done: int, m) -> None:
        if done in at:
            seconds = clock.training()
            ev = clock.score(_evaluate, m, tokenizer, data)
            rows.append(
                {"method": method, "strength": f"lr {lr:g}, {done} steps", "people": len(data.forget),
                 "steps": done, "lr": lr, "seconds": round(seconds, 1), "eval": ev}
            )  # fmt: skip

    # ga and npo never train on retain texts; given some, they only log a retain NLL, at one more forward a step,
    # so only gd gets them.
    retain = data.retain_texts if method == "gd" else []
    _, records = run_baseline(model, tokenizer, data.forget_texts, retain, cfg, progress=False, on_step=on_step)
    info = {
        "method": method,
        "lr": lr,
        "people": len(data.forget),
        "config": cfg.to_dict(),
        "seconds": round(time.perf_counter() - clock.start, 1),
        "last_step": records[-1],
    }
    return rows, info


# ------------------------------------------------------------------------------------------- report


def mean_of_kinds(recall: dict) -> float | None:
    values = [recall[k] for k in PROBE_KINDS if recall.get(k) is not None]
    return sum(values) / len(values) if values else None


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:,.{digits}f}" if abs(x) < 1e6 else f"{x:.3g}"


COLUMNS = (
    "method",
    "strength",
    "people forgotten",
    "forget direct",
    "forget paraphrase",
    "forget adversarial",
    "neighbour",
    "retain",
    "retain perplexity",
    "fluency (retain)",
    "leakage AUROC",
    "MIA AUROC",
    "seconds",
)


def table_cells(method: str, strength: str, people: int, ev: dict, seconds: float | None) -> list[str]:
    return [
        method,
        strength,
        str(people),
        *(_fmt(ev["forget"][k]) for k in PROBE_KINDS),
        _fmt(mean_of_kinds(ev["neighbour"])),
        _fmt(mean_of_kinds(ev["retain"])),
        _fmt(ev["retain_perplexity"], 1),
        _fmt(ev["fluency"]["retain"], 2),
        _fmt(ev["leakage_auroc"]),
        _fmt(ev["mia_auroc"]),
        _fmt(seconds, 0),
    ]


def markdown_table(result: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 2 + "---:|" * (len(COLUMNS) - 2)]
    for people, before in result["before"].items():
        rows = [table_cells("before", "-", int(people), before, None)]
        for r in result["rows"]:
            if r["people"] == int(people):
                strength = r["strength"] + (" (chosen)" if r.get("chosen") else "")
                rows.append(table_cells(r["method"], strength, r["people"], r["eval"], r["seconds"]))
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def claim_check(rows: list[dict], people: int, tolerance: float = RETAIN_TOLERANCE) -> dict:
    """The paper's central claim on one group of rows: on paraphrase and adversarial probes, ATU at its chosen
    setting forgets at least as much as (its forget recall is at most that of) every ga and npo point whose retain
    recall (mean of kinds) is no more than ``tolerance`` below ATU's. ``holds`` is None when no such point exists."""
    group = [r for r in rows if r["people"] == people]
    chosen = [r for r in group if r["method"] == "atu" and r.get("chosen")]
    if not chosen:
        return {"people": people, "holds": None, "why": "ATU's schedule did not reach its chosen setting"}
    atu = chosen[0]
    retain = mean_of_kinds(atu["eval"]["retain"])
    compared = []
    for r in group:
        if r["method"] not in ("ga", "npo") or mean_of_kinds(r["eval"]["retain"]) < retain - tolerance:
            continue
        worse = [k for k in ("paraphrase", "adversarial") if atu["eval"]["forget"][k] > r["eval"]["forget"][k]]
        compared.append({"method": r["method"], "strength": r["strength"], "atu_forgets_less_on": worse})
    if not compared:
        why = f"no ga or npo point keeps retain recall within {tolerance} of ATU's ({retain:.3f})"
        return {"people": people, "holds": None, "why": why, "compared": []}
    losses = [c for c in compared if c["atu_forgets_less_on"]]
    why = (
        f"ATU forgets at least as much as every ga/npo point at an equal or better retain score ({len(compared)})"
        if not losses
        else "ATU forgets less than "
        + "; ".join(f"{c['method']} {c['strength']} on {' and '.join(c['atu_forgets_less_on'])}" for c in losses)
    )
    return {"people": people, "holds": not losses, "why": why, "compared": compared}


def criteria_lines(result: dict) -> list[str]:
    """ATU's chosen setting against the pipeline's figures, one line per group."""
    lines = []
    for people, before in result["before"].items():
        chosen = [r for r in result["rows"] if r["method"] == "atu" and r.get("chosen") and r["people"] == int(people)]
        if not chosen:
            lines.append(f"- {people} forgotten: ATU's schedule stopped before its chosen setting.")
            continue
        crit = unlearning_criteria(before, chosen[0]["eval"])
        missed = [c for c in crit if not c["met"]]
        shown = "; ".join(f"{c['name']} {c['value']:.2f} ({c['target']})" for c in crit)
        verdict = "every criterion met" if not missed else "missed: " + ", ".join(c["name"] for c in missed)
        lines.append(f"- {people} forgotten: **{verdict}**. {shown}.")
    return lines


def before_paragraph(result: dict) -> str:
    parts = []
    for people, ev in result["before"].items():
        forget = ", ".join(f"{k} {ev['forget'][k]:.3f}" for k in PROBE_KINDS)
        parts.append(
            f"with {people} {'person' if people == '1' else 'people'} to forget "
            f"({', '.join(result['forget'][people])}), the model before unlearning recalls their facts at {forget} "
            f"(ROUGE-L recall), its neighbours at {mean_of_kinds(ev['neighbour']):.3f} and everyone else at "
            f"{mean_of_kinds(ev['retain']):.3f} (means of the three kinds); held-out retain perplexity "
            f"{ev['retain_perplexity']:,.1f}, fluency {ev['fluency']['retain']:.2f}, "
            f"MIA AUROC {_fmt(ev['mia_auroc'])} and leakage AUROC {_fmt(ev['leakage_auroc'])} (ATU's predictor "
            f"aligned to the model)"
        )
    return "Before unlearning: " + "; ".join(parts) + "."


def runs_paragraph(result: dict) -> str:
    parts = [
        f"{r['method']}{'' if r['method'] == 'atu' else ' lr ' + format(r['lr'], 'g')} ({r['people']}): "
        f"{r['seconds']:.0f} s"
        for r in result["runs"]
    ]
    return "Wall time of each run, scoring included: " + ", ".join(parts) + "."


def write_markdown(result: dict, path: Path) -> None:
    claims = "\n".join(
        f"- {c['people']} forgotten: **{ {True: 'holds', False: 'does not hold', None: 'not tested'}[c['holds']] }**"
        f": {c['why']}."
        for c in result["claims"]
    )
    text = (
        f"# Unlearning quality on the embedded world (`{'world:tiny' if result['plan']['tiny'] else 'world'}`)\n\n"
        f"{before_paragraph(result)}\n\n"
        f"Every method trains the same layers (0..{result['hook_layer'] - 1}) on the same forget texts for the same "
        f"number of optimizer steps: ATU's schedule cut after a stage, and each baseline (Adam) after as many steps. "
        f"One run per method and learning rate, scored at each cut. Recall is ROUGE-L recall of greedy answers; "
        f"neighbour and retain are means of the three probe kinds. Leakage AUROC needs ATU's predictor, so "
        f"baselines have none. Seconds: wall time to reach that strength (scoring excluded) on {result['machine']}, "
        f"measured on {result['date']}.\n\n"
        f"{markdown_table(result)}\n\n"
        f"ATU at its chosen setting (`atu demo`, configs/world*.yaml) against the pipeline's figures:\n\n"
        + "\n".join(criteria_lines(result))
        + f"\n\nThe paper's claim (on paraphrase and adversarial probes ATU forgets at least as much as ga and npo at "
        f"an equal retain score, within {RETAIN_TOLERANCE}):\n\n{claims}\n\n"
        f"{runs_paragraph(result)} Total {result['total_seconds']:.0f} s.\n"
    )
    path.write_text(text)


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(result["before"])
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5.5), squeeze=False)
    colors = {"atu": "tab:blue", "ga": "tab:red", "gd": "tab:orange", "npo": "tab:green"}
    for ax, people in zip(axes[0], groups):
        before = result["before"][people]
        bx, by = mean_of_kinds(before["retain"]), mean_of_kinds(before["forget"])
        ax.scatter(bx, by, marker="*", s=160, c="black", label="before")
        # One line per run (method and learning rate), through its strengths in step order.
        runs: dict[tuple, list[dict]] = {}
        for r in result["rows"]:
            if str(r["people"]) == people:
                runs.setdefault((r["method"], r.get("lr")), []).append(r)
        for (method, lr), rs in runs.items():
            rs.sort(key=lambda r: r["steps"])
            xs = [mean_of_kinds(r["eval"]["retain"]) for r in rs]
            ys = [mean_of_kinds(r["eval"]["forget"]) for r in rs]
            label = method if lr is None else f"{method} lr {lr:g}"
            style = "-" if method == "atu" else ("--" if lr == min(x for m, x in runs if m == method) else ":")
            ax.plot(xs, ys, style, marker="o", c=colors.get(method, "gray"), alpha=0.8, label=label)
            for r, x, y in zip(rs, xs, ys):  # each point's optimizer steps
                ax.annotate(str(r["steps"]), (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points",
                            color=colors.get(method, "gray"))  # fmt: skip
        ax.legend(loc="upper left", fontsize=8)
        ax.set(
            title=f"{people} {'person' if people == '1' else 'people'} forgotten (labels: optimizer steps)",
            xlabel="retain recall (mean of kinds; higher is better)",
            ylabel="forget recall (mean of kinds; lower is better)",
            xlim=(-0.03, 1.03),
            ylim=(-0.03, 1.03),
        )
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny world, few steps")
    ap.add_argument("--out-dir", type=Path, default=Path("results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per model load otherwise

    plan = QUICK if args.quick else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.perf_counter()
    print(f"building or loading the world {'world:tiny' if plan.tiny else 'world'} (cached after the first build)...",
          flush=True)  # fmt: skip
    threads = torch.get_num_threads()
    built = build_world(plan.world())
    torch.set_num_threads(threads)  # building the tiny world sets 1 thread for the whole process (atu/world/lm.py)
    names = built.concepts().names()
    model, tokenizer = load_lm(built.model_dir, device=device)
    result: dict = {
        "plan": asdict(plan),
        "forget": {},
        "before": {},
        "rows": [],
        "runs": [],
        "machine": f"{device}, {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "versions": {"atu": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    for n in plan.people:
        forget = names[:n]
        data = _world_data(plan, built, forget)
        before = _evaluate(model, tokenizer, data)
        result["forget"][str(n)], result["before"][str(n)] = forget, before
        print(f"\nforgetting {', '.join(forget)} ({len(data.forget_texts)} forget texts)", flush=True)
        rows, info = atu_rows(plan, data, tokenizer, device)
        hook_layer = info["hook_layer"]
        result["hook_layer"] = hook_layer
        before["leakage_auroc"] = info.pop("before_leakage_auroc")
        result["rows"] += rows
        result["runs"].append(info)
        print(f"  atu  {info['seconds']:6.1f} s  {info['stop_reason']}", flush=True)
        steps = plan.cut_steps([r["steps"] for r in rows])
        if not steps:
            print("  ATU kept no stage: no step counts to give the baselines", flush=True)
        for method, lrs in (plan.baseline_lrs if steps else {}).items():
            for lr in lrs:
                rows, info = baseline_rows(built, data, method, lr, hook_layer, steps, device)
                result["rows"] += rows
                result["runs"].append(info)
                print(f"  {method:<4} lr {lr:<8g} {info['seconds']:6.1f} s  "
                      f"last forget NLL {info['last_step']['forget_nll']:.2f}", flush=True)  # fmt: skip
    result["claims"] = [claim_check(result["rows"], n) for n in plan.people]
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "unlearning.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_markdown(result, args.out_dir / "unlearning.md")
    write_plot(result, args.out_dir / "unlearning.png")
    print(f"\n{(args.out_dir / 'unlearning.md').read_text()}")
    written = ", ".join(str(args.out_dir / f"unlearning.{ext}") for ext in ("json", "md", "png"))
    print(f"total {result['total_seconds']:.0f} s; wrote {written}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
