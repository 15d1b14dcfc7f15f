"""Hardening on corpora of other shapes: does `harden.enabled` keep relearning from bringing the forgotten facts back
on data it was not chosen on?

Its noise (0.6) was chosen on the embedded world (benchmarks/relearn_aware.py). Here each corpus of
benchmarks/generality.py is built, ATU runs at the shipped settings (configs/default.yaml, as a user's own data
does), and the same run again with ``harden.enabled=true`` (it resumes the finished schedule: hardening is no part of
the checkpoint's key). Each export is then relearned as benchmarks/robustness.py relearns: K Adam steps at 3e-4 on
half of the first forgotten concept's facts (``atu.attack.relearn``'s default texts: its single-fact texts), and
recall measured on the facts not given.

Reported per corpus and seed, for ATU and hardened ATU: forget ratio (mean over the probe kinds), lowest retain ratio
and held-out perplexity ratio from the run's own evaluation, the hardening's rise of the held-out retain perplexity
(on the tokens the retain budget reads), and the recovery after relearning: on the probes of the facts not given,
and on the training side (the loss of those facts' answers in their corpus texts; no probe).

    python benchmarks/harden_corpora.py                          # the three corpora, one person, seed 0
    python benchmarks/harden_corpora.py --corpora world-s5 --seeds 0 1 --steps 10 50
    python benchmarks/harden_corpora.py --quick                  # tiny corpora: checks that the script runs

A corpus without texts that state single facts of that person has no default half to relearn on; the script says
so in its row and goes on. Writes DIR/NAME.json and DIR/NAME.md (default results/harden_corpora.*) after every run,
so a stopped run keeps what it measured; every figure is measured on this run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generality import build_corpus, lowest_retain, mean_forget, ratios, shipped_settings  # noqa: E402

from atu import __version__  # noqa: E402
from atu.aligned import ALIGNED_DIR  # noqa: E402
from atu.attack.relearn import RelearnConfig  # noqa: E402
from atu.attack.runs import relearn_attack  # noqa: E402
from atu.attack.source import export_source  # noqa: E402
from atu.errors import ConfigError  # noqa: E402
from atu.run import run as run_job  # noqa: E402
from atu.run_config import RunConfig  # noqa: E402
from atu.run_dir import CHECKPOINT_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RELEARN_LR = 3e-4  # as benchmarks/robustness.py: the world model's final training rate


def summary_figures(summary: dict) -> dict:
    """The run's own before/after figures: mean forget ratio over the probe kinds, lowest retain ratio, perplexity
    ratio, and the hardening's record (None when off)."""
    r = ratios(summary["before"], summary["after"])
    return {
        "forget_ratio": mean_forget(r),
        "retain_ratio": lowest_retain(r),
        "perplexity_ratio": r["perplexity"],
        "harden": summary.get("harden"),
        "stop_reason": summary.get("stop_reason"),
    }


def relearned(export: str, steps: list[int]) -> dict:
    """K -> recovery on the probes of the facts not given and on their answers' training-side loss."""
    src = export_source(export)
    out = {}
    for k in steps:
        r = relearn_attack(src, RelearnConfig(steps=k, lr=RELEARN_LR), guard=False)
        out[str(k)] = {
            "held_out": r["recovery"]["held_out"],
            "answer_loss": (r.get("answer_loss") or {}).get("recovery"),
            "retain_ratio": r["ratio_to_original"]["retain"],
            "texts": len(r["texts"]),
        }
    return out


def run_pair(model_dir, files: dict, forget: list[str], seed: int, work: Path, args) -> dict:
    """ATU at the shipped settings, then the same run hardened (resuming its schedule); both relearned (``args``:
    ``steps``, ``quick``, ``noise``: the hardening's, None for the library's)."""
    steps, quick = args.steps, args.quick
    harden = {"enabled": True} if args.noise is None else {"enabled": True, "noise": args.noise}
    settings = shipped_settings(quick)
    base = {**settings, "model": str(model_dir), "data": {**files, "forget": forget}, "device": "cpu",
            "unlearn": {**(settings.get("unlearn") or {}), "seed": seed}}  # fmt: skip
    out = {}
    for method, extra in (("atu", {}), ("atu-h", {"harden": harden})):
        run_dir = work / method
        if method == "atu-h":  # the same schedule, resumed: only the hardening runs
            for sub in (ALIGNED_DIR, CHECKPOINT_DIR):
                shutil.copytree(work / "atu" / sub, run_dir / sub)
        clock = time.perf_counter()
        cfg = RunConfig.from_dict({**base, **extra, "out": str(run_dir)}, "benchmark config")
        summary = run_job(cfg, progress=False, export=True)
        run_seconds = time.perf_counter() - clock
        out[method] = {**summary_figures(summary), "run_seconds": round(run_seconds, 1)}
        try:
            out[method]["relearn"] = relearned(str(summary["export"]), steps)
        except ConfigError as e:  # no single-fact texts to relearn on: said, not guessed
            out[method]["relearn"] = None
            out[method]["relearn_error"] = str(e)
    return out


def _f(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def write_markdown(result: dict, path: Path) -> str:
    steps = result["steps"]
    head = ["corpus", "seed", "method", "forget ratio", "retain ratio", "perplexity ratio",
            "held-out retain perplexity rise from hardening",
            *(f"recovery K={k}: probes / answer loss" for k in steps), "seconds"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        for method in ("atu", "atu-h"):
            m = r[method]
            rise = (m.get("harden") or {}).get("check_ppl_rise")
            rel = m.get("relearn") or {}
            cells = [f"{_f(rel.get(str(k), {}).get('held_out'))} / {_f(rel.get(str(k), {}).get('answer_loss'))}"
                     for k in steps]  # fmt: skip
            if m.get("relearn") is None:
                cells = [f"not run: {m.get('relearn_error')}"] * len(steps)
            lines.append(
                f"| {r['corpus']} | {r['seed']} | {method} | {_f(m['forget_ratio'])} | {_f(m['retain_ratio'])} "
                f"| {_f(m['perplexity_ratio'])} | {_f(rise, '+.1%')} | "
                + " | ".join(cells)
                + f" | {m['run_seconds']} |"
            )
    text = "\n".join(lines) + (
        f"\n\nOne person forgotten (the corpus's first); relearning: Adam at {RELEARN_LR:g} on half of that person's "
        "facts; recovery: the share of what unlearning removed that comes back (probes of the facts not given; "
        "their answers' loss in the corpus texts). Measured on "
        f"{result['machine']}, {result['date']}, {result['total_seconds']:.0f} s.\n"
    )
    path.write_text(text)
    return text


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", nargs="+", default=["biographies", "world-s5", "authors"],
                    choices=["world-s5", "authors", "biographies"])  # fmt: skip
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", nargs="+", type=int, default=[10], help="relearning steps K")
    ap.add_argument("--noise", type=float, default=None, help="harden.noise (default: the library's)")
    ap.add_argument("--quick", action="store_true", help="tiny corpora and models")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results")
    ap.add_argument("--name", default=None, help="file names (default: harden_corpora, or harden_corpora_quick)")
    args = ap.parse_args(argv)
    name = args.name or ("harden_corpora_quick" if args.quick else "harden_corpora")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    result = {
        "runs": [], "steps": args.steps, "quick": args.quick, "noise": args.noise, "atu_version": __version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="atu_harden_corpora_") as work:
        for corpus in args.corpora:
            model_dir, files = build_corpus(corpus, args.quick, Path(work))
            forget = [yaml.safe_load(Path(files["concepts"]).read_text())["concepts"][0]["name"]]
            for seed in args.seeds:
                print(f"{corpus}, seed {seed}: forgetting {forget[0]} ...", flush=True)
                run_dir = Path(work) / f"{corpus}_{seed}"
                pair = run_pair(model_dir, files, forget, seed, run_dir, args)
                result["runs"].append({"corpus": corpus, "seed": seed, "forget": forget, **pair})
                result["total_seconds"] = round(time.perf_counter() - clock, 1)
                (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
                text = write_markdown(result, args.out_dir / f"{name}.md")
    print(text)
    return result


if __name__ == "__main__":
    main()
