"""Forgetting that survives deployment: quantization, relearning, and the guard as the second line.

ATU, ATU with quantization-aware unlearning at the int4 setting (atu-q4), gradient ascent (ga), gradient difference
(gd) and NPO at their chosen settings (benchmarks/unlearning.py: ATU's whole schedule, `atu demo`'s; each baseline at
its learning rate there, for as many optimizer steps as ATU took) forget the first n people of the embedded world.
Each unlearned model, and the original, is then attacked:

- quantized: int8 RTN per output channel, int4 RTN in groups (``atu.attack.quantize``), and torch's CPU int8
  kernels (``torch.ao`` dynamic quantization, W8A8: the one real low-bit kernel on this CPU; no int4 kernel runs
  here);
- relearned: K steps of fine-tuning (every parameter, Adam) on half of the first forgotten person's facts
  (``atu.attack.relearn``), K in ``Plan.relearn_steps``; recall is measured on that person's facts not given.

Forget ratio: the unlearned model's forget recall (mean of the probe kinds) over the original's at full precision;
retain ratio: over the original's quantized the same way. Recovery: the share of the recall that unlearning removed
which relearning brings back. Collapse: the share of the weights the unlearning changed whose quantized value differs
from the quantized original's. The guard (ATU's export: its predictor, concept index and calibrated thresholds,
``atu.attack.guard``) scores every attacked model's answers, with states from its own full-precision copy of ATU's
export ("own") and from the attacked model itself ("attacked"); the baselines have no guard of their own.

    python benchmarks/robustness.py --quick          # the tiny world: checks that the script runs (20 min here)
    python benchmarks/robustness.py                  # the world, 1 and 3 people, seed 0
    python benchmarks/robustness.py --people 1 --methods atu ga --seeds 0 1 2

Each group (people, seed) is ATU's run, then one task per method and one for the original model; ``--jobs`` (default
2) processes run the tasks side by side, each with its share of the torch threads.

Writes DIR/robustness.json, DIR/robustness.md and DIR/robustness.png (default DIR: results; robustness_quick.* with
--quick). Every figure is measured on this run.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import unlearning  # benchmarks/unlearning.py: the methods' chosen settings

from atu import __version__, formats
from atu.aligned import ALIGNED_DIR
from atu.attack.guard import catch_rates, export_scorer, guard_rows, named_examples, server_answers
from atu.attack.quantize import QuantConfig, bucket_collapse, collapse_summary, int8_dynamic, quantize_model
from atu.attack.relearn import RelearnConfig, default_relearn_texts, recovery, relearn
from atu.attack.runs import INT8_KERNEL, mean_of_kinds, relearn_groups
from atu.attack.source import export_source
from atu.baselines import BaselineConfig, run_baseline
from atu.evaluation.evaluate import neighbour_names
from atu.evaluation.probes import mean_recall_by_kind
from atu.loading import load_lm
from atu.run import run as run_atu
from atu.run_config import RunConfig, demo_settings
from atu.run_data import load_run_data
from atu.run_dir import CHECKPOINT_DIR
from atu.world.build import WORLD_FILES, build_world

# atu-q4: ATU with quantization-aware unlearning at the plan's int4 setting (unlearn.quant_aware_bits)
# atu-h: ATU's own unlearned model hardened against relearning (harden.noise at HARDEN_NOISE), with its own export
METHODS = ("atu", "atu-h", "atu-q4", "ga", "gd", "npo")
HARDEN_NOISE = 0.6


@dataclass(frozen=True)
class Plan:
    tiny: bool
    people: tuple[int, ...]
    int4_group: int  # input columns per int4 step (the world model is 256 wide, the tiny one 64)
    relearn_steps: tuple[int, ...]
    relearn_lr: float  # the world model's own final training learning rate (3e-3, decayed to 0.1x)

    def quantizations(self) -> list[QuantConfig]:
        return [QuantConfig(8), QuantConfig(4, self.int4_group)]

    def unlearning(self) -> unlearning.Plan:
        return unlearning.QUICK if self.tiny else unlearning.FULL


FULL = Plan(tiny=False, people=(1, 3), int4_group=128, relearn_steps=(10, 50), relearn_lr=3e-4)
QUICK = Plan(tiny=True, people=(1, 2), int4_group=32, relearn_steps=(10, 50), relearn_lr=3e-4)


# ------------------------------------------------------------------------------------------- measuring one model


class Bench:
    """What every measurement of one group of forgotten people shares: probes, groups of probes, the guard."""

    def __init__(self, export_dir: str):
        self.src = export_source(export_dir)
        self.probes = formats.read_probes(self.src.data.probes)
        self.concepts = formats.read_concepts(self.src.data.concepts)
        self.guard_model, self.tokenizer = load_lm(self.src.export.model_dir)  # the guard's own fp32 copy
        forget = set(self.src.forget)
        neighbours = set(neighbour_names(self.concepts, self.src.forget))
        self.groups = {
            "forget": {(p.concept, p.question) for p in self.probes if p.concept in forget},
            "neighbour": {(p.concept, p.question) for p in self.probes if p.concept in neighbours},
            "retain": {(p.concept, p.question) for p in self.probes if p.concept not in forget | neighbours},
        }

    def measure(self, model, groups: dict | None = None) -> dict:
        """Every probe answered once: recall by group and kind, and the guard's catch and false-flag rates."""
        answers = server_answers(model, self.tokenizer, self.probes)
        scorers = {
            "own": export_scorer(self.src.export, self.guard_model, self.tokenizer),
            "attacked": export_scorer(self.src.export, model, self.tokenizer),
        }
        rows = guard_rows(self.tokenizer, self.probes, answers, scorers, self.src.forget)
        for r, p in zip(rows, self.probes):
            r["key"] = (p.concept, p.question)
        recall = {
            g: mean_recall_by_kind([r for r in rows if r["key"] in keys])
            for g, keys in (groups or self.groups).items()
        }
        guard = {s: catch_rates(rows, s) for s in ("own", "attacked")}
        return {"recall": recall, "guard": guard, "guard_examples": named_examples(rows, "own")}


def precisions(plan: Plan) -> list[tuple[str, object]]:
    out = [("fp32", None)]
    out += [(q.label, lambda m, q=q: quantize_model(m, q)) for q in plan.quantizations()]
    return out + [(INT8_KERNEL, int8_dynamic)]


# ------------------------------------------------------------------------------------------- one group of people
# A group (n people, one seed) starts with ATU's run: its export is the guard every model is scored with, and its
# optimizer steps are the baselines'. Then each method, and the original, is one task that unlearns (the baselines,
# atu-q4) and attacks its own model. The tasks share nothing but files, so --jobs runs them side by side.

ORIGINAL = "original"
# the longest first, so the last task to start is short
TASK_ORDER = ("atu-q4", "gd", "npo", "atu-h", "ga", "atu", ORIGINAL)


def atu_config(plan: Plan, forget: list[str], seed: int, out: str, variant: str = "atu") -> RunConfig:
    raw = {**demo_settings(len(forget), plan.tiny), "data": {"forget": forget}, "out": out, "device": "cpu"}
    raw["unlearn"] = {**raw.get("unlearn", {}), "seed": seed}
    if variant == "atu-q4":  # the same job, seeing the model through the int4 quantizer it is attacked with
        raw["unlearn"].update(quant_aware_bits=4, quant_aware_group_size=plan.int4_group)
    if variant == "atu-h":
        raw["harden"] = {"enabled": True, "noise": HARDEN_NOISE}
    return RunConfig.from_dict(raw, "benchmark config")


def atu_stage(plan: Plan, n: int, seed: int, out: str) -> dict:
    """ATU's run forgetting the world's first ``n`` people: what the group's other tasks need from it."""
    clock = time.perf_counter()
    forget = build_world(plan.unlearning().world()).concepts().names()[:n]
    run_dir = Path(out) / f"{n}p_seed{seed}"
    summary = run_atu(atu_config(plan, forget, seed, str(run_dir / "atu")), progress=False, export=True)
    return {
        "people": n, "seed": seed, "forget": forget, "dir": str(run_dir), "export": str(summary["export"]),
        "steps": sum(s["steps"] for s in summary["stages"]),  # the optimizer steps of the stages ATU kept
        "hook_layer": summary["hook_layer"], "seconds": round(time.perf_counter() - clock, 1),
    }  # fmt: skip


def unlearned_model(plan: Plan, group: dict, method: str):
    """(the model ``method`` leaves, its own export or None): ATU's export, ATU quantization-aware, ATU hardened, or
    a baseline after ATU's steps (the baselines and atu-q4 are guarded by ATU's export)."""
    if method == "atu":
        return load_lm(Path(group["export"]) / "model")[0], None
    if method in ("atu-q4", "atu-h"):
        run_dir = Path(group["dir"]) / method
        # ATU's alignment is the same job's: its run reuses the aligned predictor (keyed by model, texts, config)
        shutil.copytree(Path(group["dir"]) / "atu" / ALIGNED_DIR, run_dir / ALIGNED_DIR)
        if method == "atu-h":  # hardening is no part of the checkpoint's key: the run resumes ATU's finished schedule
            shutil.copytree(Path(group["dir"]) / "atu" / CHECKPOINT_DIR, run_dir / CHECKPOINT_DIR)
        export = run_atu(atu_config(plan, group["forget"], group["seed"], str(run_dir), method), progress=False)
        return load_lm(Path(export["export"]) / "model")[0], export["export"] if method == "atu-h" else None
    world = build_world(plan.unlearning().world())
    cfg = atu_config(plan, group["forget"], group["seed"], group["dir"])
    data = load_run_data(cfg, {k: str(world.path(v)) for k, v in WORLD_FILES.items()})
    lr = plan.unlearning().baseline_lrs[method][0]
    steps, seed = group["steps"], group["seed"]
    bcfg = BaselineConfig(method=method, hook_layer=group["hook_layer"], steps=steps, lr=lr, seed=seed)
    model, tokenizer = load_lm(world.model_dir)
    retain = data.retain_texts if method == "gd" else []  # as benchmarks/unlearning.py: only gd trains on them
    return run_baseline(model, tokenizer, data.forget_texts, retain, bcfg, progress=False)[0], None


def method_task(plan: Plan, group: dict, method: str) -> dict:
    """One method's model (or the original's, ``ORIGINAL``) unlearned and attacked: its raw measurements."""
    clock = time.perf_counter()
    bench = Bench(group["export"])
    original, _ = load_lm(bench.src.original)
    concept = bench.src.forget[0]
    texts = default_relearn_texts(formats.read_corpus(bench.src.data.corpus), bench.probes, concept)
    rgroups = relearn_groups(bench.probes, bench.src.forget, concept, texts)
    if method == ORIGINAL:
        out = {label: bench.measure(make(original) if make else original) for label, make in precisions(plan)}
        out["relearn"] = bench.measure(original, rgroups)  # before unlearning, on the relearning groups
        seconds = {"attack": round(time.perf_counter() - clock, 1)}
        return {"measured": out, "relearn_texts": len(texts), "seconds": seconds}
    model, export = unlearned_model(plan, group, method)
    unlearn_s = time.perf_counter() - clock
    out = attack_method(plan, Bench(export) if export else bench, original, model, texts, rgroups)
    seconds = {"unlearn": round(unlearn_s, 1), "attack": round(time.perf_counter() - clock - unlearn_s, 1)}
    out["seconds"] = seconds
    return {"measured": out, "seconds": seconds}


def attack_method(plan: Plan, bench: Bench, original, model, texts, rgroups) -> dict:
    """Every attack on one unlearned model, measured (``with_ratios`` relates them to the original's)."""
    out: dict = {"precisions": {}, "collapse": {}, "relearn": {}}
    for label, make in precisions(plan):
        out["precisions"][label] = bench.measure(make(model) if make else model)
    for q in plan.quantizations():
        out["collapse"][q.label] = collapse_summary(bucket_collapse(original, model, q))
    out["relearn"]["0"] = bench.measure(model, rgroups)
    for k in plan.relearn_steps:
        cfg = RelearnConfig(steps=k, lr=plan.relearn_lr)
        relearned, records = relearn(copy.deepcopy(model), bench.tokenizer, texts, cfg)
        m = bench.measure(relearned, rgroups)
        m["loss"] = [records[0]["loss"], records[-1]["loss"]]
        out["relearn"][str(k)] = m
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def with_ratios(m: dict, orig: dict) -> dict:
    """``m`` (``attack_method``'s) with each precision's forget and retain ratio and each relearning's recovery."""
    before = mean_of_kinds(orig["fp32"]["recall"]["forget"])
    for label, p in m["precisions"].items():
        p["forget_ratio"] = _ratio(mean_of_kinds(p["recall"]["forget"]), before)
        retain_before = mean_of_kinds(orig[label]["recall"]["retain"])
        p["retain_ratio"] = _ratio(mean_of_kinds(p["recall"]["retain"]), retain_before)
    unl = m["relearn"]["0"]
    for k, r in m["relearn"].items():
        if k != "0":
            groups = ("held_out", "given", "other_forgotten")
            r["recovery"] = {
                g: recovery(*(mean_of_kinds(x["recall"][g]) for x in (orig["relearn"], unl, r))) for g in groups
            }
    return m


def finish_group(stage: dict, tasks: dict, methods) -> dict:
    """One group's result from its ATU run and its tasks' measurements."""
    orig = tasks[ORIGINAL]
    res = {"people": stage["people"], "seed": stage["seed"], "forget": stage["forget"]}
    res.update(relearn_texts=orig["relearn_texts"], original=orig["measured"], methods={})
    for method in methods:
        res["methods"][method] = with_ratios(tasks[method]["measured"], orig["measured"])
    seconds = [t["seconds"].get("unlearn", 0) + t["seconds"]["attack"] for t in tasks.values()]
    res["seconds"] = round(stage["seconds"] + sum(seconds), 1)  # work, whichever process did it
    return res


# ------------------------------------------------------------------------------------------- running the tasks


class _Inline:
    """An executor that runs each task when it is submitted, in this process (``--jobs 1``)."""

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as e:  # the caller's ``result()`` raises it, as from a process
            f.set_exception(e)
        return f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _init_worker(threads: int) -> None:
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()


def executor(jobs: int):
    """``jobs`` processes sharing this process's torch threads between them (one process: this one)."""
    if jobs <= 1:
        return _Inline()
    threads = max(1, torch.get_num_threads() // jobs)
    ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
    return ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,))


def run_tasks(plan: Plan, groups: list[tuple[int, int]], order, jobs: int, stage=atu_stage, task=method_task):
    """({group: its ATU run}, {group: {method: its task's result}}): each group's ATU run (``stage``) first, then
    its tasks (``task``, one per method in ``order``) as soon as it is done, ``jobs`` at a time."""
    t0 = time.perf_counter()
    stages: dict = {}
    tasks: dict = {g: {} for g in groups}
    with tempfile.TemporaryDirectory(prefix="atu_robust_") as out, executor(jobs) as pool:
        pending = {pool.submit(stage, plan, n, seed, out): (None, (n, seed)) for n, seed in groups}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                method, g = pending.pop(f)
                if method is None:
                    stages[g] = f.result()
                    pending.update({pool.submit(task, plan, stages[g], m): (m, g) for m in order})
                else:
                    tasks[g][method] = f.result()
                print(f"  {g[0]} forgotten, seed {g[1]}: {method or 'ATU run'} done "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    return stages, tasks


def run_groups(plan: Plan, methods, groups: list[tuple[int, int]], jobs: int, keep: Path) -> list[dict]:
    """Every (people, seed) group's result, in the order of ``groups``; the tasks' measurements are written to
    ``keep`` before they are put together, and ``keep`` is removed once they are."""
    order = [m for m in TASK_ORDER if m in methods or m == ORIGINAL]
    stages, tasks = run_tasks(plan, groups, order, jobs)
    raw = {f"{n} people, seed {s}": {"stage": stages[(n, s)], "tasks": tasks[(n, s)]} for n, s in groups}
    keep.write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")
    out = [finish_group(stages[g], tasks[g], methods) for g in groups]
    keep.unlink()
    return out


# ------------------------------------------------------------------------------------------- report

TARGETS = {"forget_int4": 0.30, "retain_int4": 0.90, "recovery_k10": 0.25, "catch": 0.80, "false_flags": 0.05}


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def attacked(m: dict) -> list[tuple[str, dict]]:
    """(label, measurement) of every attacked model of one method: each quantization and each relearning."""
    out = [(label, p) for label, p in m["precisions"].items() if label != "fp32"]
    return out + [(f"relearn K={k}", r) for k, r in m["relearn"].items() if k != "0"]


def guard_extremes(
    m: dict, source: str, scope: str = "", flags_of: str = "false_flag_rate"
) -> tuple[float | None, float | None, int]:
    """(lowest catch rate, highest false-flag rate, leaking answers in all) over the attacked models; ``scope``
    "exchange_": counting the question's flags too; "names_" and "names_exchange_": with the guard's name check;
    "named_": with it, and the question counted only when it writes a forgotten name. ``flags_of``
    "clean_false_flag_rate": the false flags on the answers that give no forgotten concept's value;
    "innocent_false_flag_rate": on those that write no forgotten name either (answers that carry nothing forgotten);
    "nameless_false_flag_rate": on those whose question writes none either."""
    catches = [g["guard"][source].get(f"{scope}catch_rate") for _, g in attacked(m)]
    flags = [g["guard"][source].get(f"{scope}{flags_of}") for _, g in attacked(m)]
    leaks = sum(g["guard"][source]["leaks"] for _, g in attacked(m))
    known = [c for c in catches if c is not None]
    flags = [f for f in flags if f is not None]
    return (min(known) if known else None), (max(flags) if flags else None), leaks


def summary_rows(result: dict) -> list[list[str]]:
    rows = []
    for g in result["groups"]:
        labels = result["precisions"]
        for method, m in g["methods"].items():
            p = m["precisions"]
            int4 = [k for k in m["collapse"] if k.startswith("int4")][0]
            c4 = m["collapse"][int4]
            own = guard_extremes(m, "own")
            own_x = guard_extremes(m, "own", "exchange_")
            own_n = guard_extremes(m, "own", "names_")
            own_nx = guard_extremes(m, "own", "names_exchange_")
            own_named = guard_extremes(m, "own", "named_")
            clean_named = guard_extremes(m, "own", "named_", "clean_false_flag_rate")[1]
            innocent = guard_extremes(m, "own", "named_", "innocent_false_flag_rate")[1]
            nameless = guard_extremes(m, "own", "named_", "nameless_false_flag_rate")[1]
            att = guard_extremes(m, "attacked")
            rows.append([
                str(g["people"]), str(g["seed"]), method,
                " / ".join(_f(p[x]["forget_ratio"]) for x in labels),
                " / ".join(_f(p[x]["retain_ratio"]) for x in labels),
                f"{c4['layers_collapsed']}/{c4['layers_updated']}, {_f(c4['flipped'])}",
                " / ".join(_f(m["relearn"][str(k)]["recovery"]["held_out"]) for k in result["plan"]["relearn_steps"]),
                f"{_f(own[0])} / {_f(own[1], 3)} ({own[2]})",
                f"{_f(own_x[0])} / {_f(own_x[1], 3)}",
                f"{_f(own_n[0])} / {_f(own_n[1], 3)}",
                f"{_f(own_nx[0])} / {_f(own_nx[1], 3)}",
                f"{_f(own_named[0])} / {_f(own_named[1], 3)} "
                f"({_f(clean_named, 3)}; {_f(innocent, 3)}; {_f(nameless, 3)})",
                f"{_f(att[0])} / {_f(att[1], 3)} ({att[2]})",
            ])  # fmt: skip
    return rows


VERDICTS = (("atu", "ATU"), ("atu-h", "ATU hardened"))  # the methods held to the targets


def verdict_lines(result: dict) -> list[str]:
    lines = []
    for g, label, m in [(g, label, g["methods"].get(k)) for g in result["groups"] for k, label in VERDICTS]:
        if m is None:
            continue
        int4 = [k for k in m["precisions"] if k.startswith("int4")][0]
        forget4, retain4 = m["precisions"][int4]["forget_ratio"], m["precisions"][int4]["retain_ratio"]
        rec10 = m["relearn"].get("10", {}).get("recovery", {}).get("held_out")
        catch, flags, leaks = guard_extremes(m, "own")
        catch_x, flags_x, _ = guard_extremes(m, "own", "exchange_")
        catch_nx, flags_nx, _ = guard_extremes(m, "own", "names_exchange_")
        catch_nd, flags_nd, _ = guard_extremes(m, "own", "named_")
        clean_nd = guard_extremes(m, "own", "named_", "clean_false_flag_rate")[1]
        innocent_nd = guard_extremes(m, "own", "named_", "innocent_false_flag_rate")[1]
        nameless_nd = guard_extremes(m, "own", "named_", "nameless_false_flag_rate")[1]
        checks = [
            ("forget after int4", forget4, forget4 is not None and forget4 <= TARGETS["forget_int4"], "<= 0.30"),
            ("retain after int4", retain4, retain4 is not None and retain4 >= TARGETS["retain_int4"], ">= 0.90"),
            ("recovery at K=10", rec10, rec10 is not None and rec10 <= TARGETS["recovery_k10"], "<= 0.25"),
            ("guard catch (own states), lowest", catch, catch is not None and catch >= TARGETS["catch"], ">= 0.80"),
            ("guard false flags, highest", flags, flags is not None and flags <= TARGETS["false_flags"], "<= 0.05"),
            ("with the question's flags: catch", catch_x, catch_x is not None and catch_x >= TARGETS["catch"],
             ">= 0.80"),
            ("false flags", flags_x, flags_x is not None and flags_x <= TARGETS["false_flags"], "<= 0.05"),
            ("with names and the question's flags (`atu serve --flag-scope exchange`): catch", catch_nx,
             catch_nx is not None and catch_nx >= TARGETS["catch"], ">= 0.80"),
            ("false flags", flags_nx, flags_nx is not None and flags_nx <= TARGETS["false_flags"], "<= 0.05"),
            ("with names, the question's names only (`--flag-scope named`): catch", catch_nd,
             catch_nd is not None and catch_nd >= TARGETS["catch"], ">= 0.80"),
            ("false flags", flags_nd, flags_nd is not None and flags_nd <= TARGETS["false_flags"], "<= 0.05"),
            ("false flags on the answers that carry nothing forgotten (no forgotten name or value)", innocent_nd,
             innocent_nd is not None and innocent_nd <= TARGETS["false_flags"], "<= 0.05"),
        ]  # fmt: skip
        # false-flag rates to three digits: 0.054 against a 0.05 target must not read "0.05 (missed)"
        shown = "; ".join(
            f"{name} {_f(v, 3 if t == '<= 0.05' else 2)} ({t}: {'met' if ok else 'missed'})"
            for name, v, ok, t in checks
        )
        if clean_nd is not None:
            shown += f"; of them on the answers that give no forgotten person's value {_f(clean_nd, 3)}"
        if nameless_nd is not None:
            shown += f", and on the exchanges that write no forgotten name or value {_f(nameless_nd, 3)}"
        head = f"- {label}, {g['people']} forgotten, seed {g['seed']} ({leaks} leaking answers in all)"
        lines.append(f"{head}: {shown}.")
    return lines


HEADER = (
    "people", "seed", "method", "forget ratio (fp32 / int8 / int4 / int8 kernel)", "retain ratio (same)",
    "int4 collapse (layers, flipped share)", "recovery K=10 / 50", "guard own: min catch / max false flags (leaks)",
    "guard own, question's flags counted: same", "guard own, with names: same",
    "guard own, with names and the question's flags: same",
    "guard own, with names, the question's names only: same (false flags on the answers giving no forgotten value; "
    "and writing no forgotten name; and with no forgotten name in the question)",
    "guard attacked: same",
)  # fmt: skip


def write_markdown(result: dict, path: Path) -> None:
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += ["| " + " | ".join(r) + " |" for r in summary_rows(result)]
    plan = result["plan"]
    text = (
        f"# Robustness of unlearning on the embedded world (`{'world:tiny' if plan['tiny'] else 'world'}`)\n\n"
        f"Precisions: {', '.join(result['precisions'])}. Forget ratio: forget recall (mean of kinds) over the "
        "original's at fp32; retain ratio: over the original's at the same precision. Collapse: layers whose "
        "updated weights keep the original's quantized value (fewer than 10% move) out of the layers the unlearning "
        "changed, and the share of updated weights that move. Recovery: share of the recall unlearning removed from "
        "the first person's facts not given that comes back after K relearning steps (Adam, lr "
        f"{plan['relearn_lr']:g}, on {result['groups'][0]['relearn_texts']} texts stating half of that person's "
        "facts). Guard: over every attacked model (each quantization, each K), the lowest share of leaking answers "
        "(recall >= 0.5 about a forgotten person) flagged and the highest share of the other people's answers "
        "flagged, with ATU's export's guard; in brackets the leaking answers counted. \"Question's flags counted\": "
        "an answer also counts as flagged when the guard flags a forgotten person in its question (`atu serve "
        '--flag-scope exchange`). "With names": a forgotten person\'s name written in the answer (and in the '
        "question, where its flags count) flags it too, as `atu serve` does by default; \"the question's names "
        'only": the question counts only when it writes a forgotten name (`--flag-scope named`); in brackets there, '
        "the highest false-flag share on the other people's answers that do not give a forgotten person's value "
        "of the attribute asked about in place of their own, on those of them that write no forgotten name either "
        "(the answers that carry nothing forgotten: a guard must flag the others to keep the forgotten set out of "
        "its responses), and on those whose question writes none either. The other columns are the predictor "
        "alone.\n\n"
        + "\n".join(table)
        + "\n\nATU against the target figures:\n\n"
        + "\n".join(verdict_lines(result))
        + f"\n\nMeasured on {result['machine']}, {result['date']}; total {result['total_seconds']:.0f} s "
        f"({sum(g['seconds'] for g in result['groups']):.0f} s of work in its processes).\n"
    )
    path.write_text(text)


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = result["groups"]
    fig, axes = plt.subplots(2, len(groups), figsize=(6 * len(groups), 8), squeeze=False)
    for col, g in enumerate(groups):
        methods = list(g["methods"])
        labels = list(g["methods"][methods[0]]["precisions"])
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ys = [g["methods"][m]["precisions"][label]["forget_ratio"] or 0 for m in methods]
            axes[0][col].bar([j + i * width for j in range(len(methods))], ys, width, label=label)
        axes[0][col].axhline(TARGETS["forget_int4"], ls="--", c="gray", lw=1)
        axes[0][col].set(title=f"{g['people']} forgotten, seed {g['seed']}: forget ratio", ylim=(0, 1.3))
        axes[0][col].set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods)
        axes[0][col].legend(fontsize=7)
        ks = result["plan"]["relearn_steps"]
        for i, k in enumerate(ks):
            ys = [g["methods"][m]["relearn"][str(k)]["recovery"]["held_out"] or 0 for m in methods]
            axes[1][col].bar([j + i * 0.4 for j in range(len(methods))], ys, 0.4, label=f"K={k}")
        axes[1][col].axhline(TARGETS["recovery_k10"], ls="--", c="gray", lw=1)
        axes[1][col].set(title="recovery of the facts not given after relearning", ylim=(-0.3, 1.3))
        axes[1][col].set_xticks([j + 0.2 for j in range(len(methods))], methods)
        axes[1][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny world")
    ap.add_argument("--people", type=int, nargs="+", help="how many people to forget (default: the plan's)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="unlearning seeds (ATU's and the baselines')")
    ap.add_argument("--out-dir", type=Path, default=Path("results"))
    ap.add_argument("--name", help="file names in --out-dir (default: robustness, or robustness_quick with --quick)")
    ap.add_argument("--jobs", type=int, default=2, help="processes running the tasks, sharing the torch threads")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    plan = QUICK if args.quick else FULL
    threads = torch.get_num_threads()
    build_world(plan.unlearning().world())
    torch.set_num_threads(threads)  # building the tiny world sets 1 thread for the whole process
    t0 = time.perf_counter()
    result: dict = {
        "plan": asdict(plan),
        "methods": ["atu", *[m for m in args.methods if m != "atu"]],  # ATU always runs: its export is the guard
        "precisions": [label for label, _ in precisions(plan)],
        "groups": [],
        "machine": f"cpu, {torch.get_num_threads()} torch threads in {args.jobs} process(es), "
        f"{platform.processor() or platform.machine()}",
        "jobs": args.jobs,
        "date": time.strftime("%Y-%m-%d"),
        "versions": {"atu": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    groups = [(n, seed) for n in args.people or plan.people for seed in args.seeds]
    print(f"forgetting {', '.join(f'{n} (seed {s})' for n, s in groups)} in {args.jobs} process(es)...", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = args.out_dir / (args.name or ("robustness_quick" if args.quick else "robustness"))
    result["groups"] = run_groups(plan, result["methods"], groups, args.jobs, Path(f"{base}.tasks.json"))
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    Path(f"{base}.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_markdown(result, Path(f"{base}.md"))
    write_plot(result, Path(f"{base}.png"))
    print(Path(f"{base}.md").read_text())
    print(f"wrote {base}.json, {base}.md, {base}.png")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
