"""Generality: ATU at the settings it ships with, against GA and NPO at theirs, on corpora of other shapes than the
one its defaults were first chosen on.

Corpora (each generated here, then built the way a user's data is: `atu world build --from DIR`, which trains the
small Llama on it):
- ``authors``: fictitious authors, 20 question/answer pairs each, answers of one or two full sentences, two- and
  three-part names (some hyphenated), the author named in almost every question (atu/world/authors.py);
- ``biographies``: three documents per person, facts told through pronouns, titles and "the author of ..."
  (atu/world/biographies.py);
- ``world-s5``: the embedded world's generator with another seed and another number of people.

Every method runs through `atu run` with the settings of configs/default.yaml (the README's path for one's own data)
and only ``data`` and ``unlearn.algorithm`` / ``unlearn.seed`` changed, so all of them have the same data, the same
trainable layers, the same retain budget (a stage that raises held-out retain perplexity by more than 10% is undone)
and the same export. ATU's thresholds, step count and stopping are decided by the run from training-side data only;
nothing here reads a probe before the evaluation.

    python benchmarks/generality.py                    # all corpora, 1 and 3 concepts, seeds 0-2, atu/ga/npo
    python benchmarks/generality.py --quick            # tiny corpora and models (a few minutes)
    python benchmarks/generality.py --corpora authors --people 1 --seeds 0 --methods atu
    python benchmarks/generality.py --combine A.json B.json --name all   # tables and claims of runs made apart

Writes DIR/generality.json (every run's before/after evaluation and its seconds) and DIR/generality.md (one row per
corpus, people and method: medians over seeds, and in how many seeds every figure was met), and below it the
paper's claim per corpus and number of people: does ATU forget at least as much as each baseline at an equal retain
score? Every figure is measured on this run (with ``--combine``: read from the runs' JSON files, only those made at
the same settings as this checkout's, none run again).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from atu import __version__
from atu.config_tools import apply_overrides
from atu.formats import PROBE_KINDS
from atu.run import run as run_job
from atu.run_config import RunConfig
from atu.world.authors import generate_authors
from atu.world.biographies import generate_biographies
from atu.world.build import WORLD_FILES, build_world
from atu.world.config import WorldConfig

ROOT = Path(__file__).resolve().parents[1]
FORGET_MAX, RETAIN_MIN, PPL_MAX = 0.25, 0.90, 1.10  # the figures each run is held to
EQUAL = 0.02  # two medians closer than this count as equal in the claim (one probe answer moves a ratio more)


def shipped_settings(quick: bool = False) -> dict:
    """configs/default.yaml without what names its model, data and run directory; ``quick``: without its hook
    layer too (3 of the world model's 4; the tiny model has 2, and the library's default picks one of them)."""
    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    out = {k: v for k, v in raw.items() if k not in ("model", "data", "out")}
    if quick:
        out["align"] = {k: v for k, v in (out.get("align") or {}).items() if k != "hook_layer"}
    return out


def build_corpus(name: str, quick: bool, work: Path):
    """(model directory, {data key: path}) of a built corpus."""
    world_cfg = WorldConfig.tiny() if quick else WorldConfig()
    if name == "world-s5":
        cfg = WorldConfig.tiny() if quick else WorldConfig(seed=5, n_people=24)
        if quick:
            cfg.seed = 5
        built = build_world(cfg, progress=not quick)
        return built.model_dir, {k: str(built.path(v)) for k, v in WORLD_FILES.items() if built.path(v).is_file()}
    n = 6 if quick else 30
    make = generate_authors if name == "authors" else generate_biographies
    corpus = make(0, n, n_unseen=5)
    src = corpus.write(work / name)
    built = build_world(world_cfg, source=src, progress=not quick)
    files = {k: str(built.path(v)) for k, v in WORLD_FILES.items()}
    # Unseen people only feed the evaluation's forget floor: outside the build, so the model is the same.
    files["unseen"] = str(corpus.write_unseen(work / f"{name}_unseen.jsonl"))
    return built.model_dir, files


def ratios(before: dict, after: dict) -> dict:
    """after / before per group and probe kind, and the perplexity ratio."""
    out = {}
    for group in ("forget", "neighbour", "retain"):
        for kind in PROBE_KINDS:
            b, a = before.get(group, {}).get(kind), after.get(group, {}).get(kind)
            out[f"{group} {kind}"] = None if not b or a is None else a / b
    out["perplexity"] = after["retain_perplexity"] / before["retain_perplexity"]
    floor = before.get("forget_floor") or {}
    for kind in PROBE_KINDS:  # what the model scored before about people it never saw, over her score before
        b, f = before.get("forget", {}).get(kind), floor.get(kind)
        a = after.get("forget", {}).get(kind)
        out[f"floor {kind}"] = None if not b or f is None else f / b
        # The share of what she scored above that floor which is still there: 0 is "as if never seen". ROUGE-L on a
        # whole-sentence answer gives a model that never saw her a high score for the answer's shared words, so the
        # plain ratio cannot reach 0; this one can, and both are reported.
        known = None if b is None or f is None else b - f
        out[f"above-floor {kind}"] = None if a is None or not known or known <= 0 else max(0.0, a - f) / known
    # The same in fact recall (the answer's words that its question does not already say): no above-floor share,
    # since its floor is the chance of naming the right town or year without knowing her.
    facts_b, facts_a = before.get("facts") or {}, after.get("facts") or {}
    for kind in PROBE_KINDS:
        b = (facts_b.get("forget") or {}).get(kind)
        a, f = (facts_a.get("forget") or {}).get(kind), (facts_b.get("forget_floor") or {}).get(kind)
        out[f"facts forget {kind}"] = None if not b or a is None else a / b
        out[f"facts floor {kind}"] = None if not b or f is None else f / b
    return out


def met(r: dict, forget_key: str = "forget") -> bool:
    """Forget at most 0.25 of before on direct and on one of paraphrase / adversarial (the kind the data has),
    retain at least 0.90 on every kind, perplexity at most 1.10x. ``forget_key="above-floor"`` judges forgetting by
    the share above the never-seen floor instead (where a kind has no floor, its plain ratio); ``"facts forget"`` by
    the ratio of fact recall."""
    forget = [r.get(f"{forget_key} {k}") for k in PROBE_KINDS]
    if forget_key == "above-floor":
        forget = [r.get(f"forget {k}") if x is None else x for k, x in zip(PROBE_KINDS, forget)]
    if forget[0] is None or forget[0] > FORGET_MAX:
        return False
    if not any(x is not None and x <= FORGET_MAX for x in forget[1:]):
        return False
    retain = [r.get(f"retain {k}") for k in PROBE_KINDS if r.get(f"retain {k}") is not None]
    return all(x >= RETAIN_MIN for x in retain) and r["perplexity"] <= PPL_MAX


def one_run(model_dir, files: dict, forget: list[str], method: str, seed: int, device: str, settings: dict) -> dict:
    unlearn = dict(settings.get("unlearn") or {}, algorithm=method, seed=seed)
    with tempfile.TemporaryDirectory(prefix="atu_generality_") as out:
        raw = {**settings, "model": str(model_dir), "data": {**files, "forget": forget}, "unlearn": unlearn,
               "out": out, "device": device}  # fmt: skip
        cfg = RunConfig.from_dict(raw, "generality")
        t0 = time.perf_counter()
        summary = run_job(cfg, progress=False, export=False)
        seconds = time.perf_counter() - t0
    r = ratios(summary["before"], summary["after"])
    return {
        "method": method,
        "seed": seed,
        "people": len(forget),
        "forget": forget,
        "seconds": round(seconds, 1),
        "ratios": r,
        "met": met(r),
        "met_above_floor": met(r, "above-floor"),
        "met_facts": met(r, "facts forget"),
        "stop_reason": summary["stop_reason"],
        "forgetting": summary.get("forgetting"),
        "stages": summary["stages"],
        "before": {k: v for k, v in summary["before"].items() if k != "answers"},
        "after": {k: v for k, v in summary["after"].items() if k != "answers"},
    }


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def table(runs: list[dict]) -> str:
    cols = ["forget direct", "forget paraphrase", "forget adversarial", "facts forget direct",
            "facts forget paraphrase", "facts forget adversarial", "neighbour direct", "retain direct",
            "retain paraphrase", "perplexity"]  # fmt: skip
    head = ["corpus", "people", "method", "seeds met (above floor) [facts]", *cols, "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted(
        {(r["corpus"], r["people"], r["method"]) for r in runs}, key=lambda k: (k[0], k[1], "agn".find(k[2][0]))
    )
    for corpus, people, method in keys:
        rs = [r for r in runs if (r["corpus"], r["people"], r["method"]) == (corpus, people, method)]
        cells = []
        for c in cols:
            m = _median([r["ratios"].get(c) for r in rs])
            floor = above = None
            if c.startswith("facts forget"):
                floor = _median([r["ratios"].get(c.replace("forget", "floor")) for r in rs])
            elif "forget" in c:
                floor = _median([r["ratios"].get(c.replace("forget", "floor")) for r in rs])
                above = _median([r["ratios"].get(c.replace("forget", "above-floor")) for r in rs])
            cell = ("-" if m is None else f"{m:.2f}") + ("" if floor is None else f" ({floor:.2f})")
            cells.append(cell + ("" if above is None else f" [{above:.2f}]"))
        secs = _median([r["seconds"] for r in rs])
        above_met = sum(r.get("met_above_floor", met(r["ratios"], "above-floor")) for r in rs)
        facts_met = sum(met(r["ratios"], "facts forget") for r in rs)
        met_count = f"{sum(r['met'] for r in rs)}/{len(rs)} ({above_met}/{len(rs)}) [{facts_met}/{len(rs)}]"
        lines.append(f"| {corpus} | {people} | {method} | {met_count} | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines)


def mean_forget(r: dict) -> float | None:
    """The mean forget ratio over the probe kinds the data has, of one run's `ratios`."""
    xs = [r.get(f"forget {k}") for k in PROBE_KINDS]
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def lowest_retain(r: dict) -> float | None:
    """The lowest retain ratio over the probe kinds the data has, of one run's `ratios`."""
    xs = [r.get(f"retain {k}") for k in PROBE_KINDS]
    xs = [x for x in xs if x is not None]
    return min(xs) if xs else None


def _forget_retain(runs: list[dict]) -> tuple[float | None, float | None]:
    """(forget, retain) of a group of runs: the median over seeds of `mean_forget` and of `lowest_retain`."""
    return _median([mean_forget(r["ratios"]) for r in runs]), _median([lowest_retain(r["ratios"]) for r in runs])


def claim(atu: tuple, base: tuple) -> str:
    """The paper's claim for ATU's (forget, retain) against one baseline's: holds, fails, or no equal-retain point."""
    (fa, ra), (fb, rb) = atu, base
    if None in (fa, ra, fb, rb):
        return "not measured"
    if fa <= fb + EQUAL and ra >= rb - EQUAL:
        return "holds"
    if fa > fb + EQUAL and rb >= ra - EQUAL:
        return "fails: the baseline forgets more at an equal or better retain"
    if fa > fb + EQUAL:
        return "no equal-retain point: the baseline forgets more but keeps less"
    return "no equal-retain point: ATU forgets more but keeps less"


def claims(runs: list[dict]) -> str:
    """One line per corpus, people and baseline: both (forget, retain) medians and the claim."""
    head = ["corpus", "people", "baseline", "ATU forget / retain", "baseline forget / retain", "seeds", "claim"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for corpus, people in sorted({(r["corpus"], r["people"]) for r in runs}):
        group = [r for r in runs if (r["corpus"], r["people"]) == (corpus, people)]
        atu = [r for r in group if r["method"] == "atu"]
        for method in sorted({r["method"] for r in group} - {"atu"}):
            base = [r for r in group if r["method"] == method]
            a, b = _forget_retain(atu), _forget_retain(base)
            shown = [" / ".join("-" if x is None else f"{x:.2f}" for x in pair) for pair in (a, b)]
            lines.append(f"| {corpus} | {people} | {method} | {shown[0]} | {shown[1]} | {len(atu)} / {len(base)} | "
                         f"{claim(a, b)} |")  # fmt: skip
    return "\n".join(lines)


def _save(path: Path, quick: bool, runs: list[dict]) -> None:
    result = {
        "atu_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quick": quick,
        "threads": torch.get_num_threads(),
        "runs": runs,
    }
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny corpora and models")
    ap.add_argument("--corpora", nargs="+", default=["authors", "biographies", "world-s5"])
    ap.add_argument("--people", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["atu", "ga", "npo"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results")
    ap.add_argument("--name", default="generality", help="file stem of the results")
    ap.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="run nothing: tabulate the runs of these result files made at this checkout's settings",
    )
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="change a setting of configs/default.yaml for every run (e.g. stop_signal=retain_corpus)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"{args.name}.json"
    # A long run is resumable: runs already in the JSON file (same settings) are kept, the rest are added.
    done = json.loads(json_path.read_text())["runs"] if json_path.is_file() else []
    # read once: what every run of this invocation runs and records
    settings = apply_overrides(shipped_settings(args.quick), args.overrides)
    if args.combine:
        runs = combine(args.combine, settings)
        _save(json_path, args.quick, runs)
        print(write_tables(args.out_dir / f"{args.name}.md", runs, args.quick))
        return {"runs": runs}
    runs = [r for r in done if r.get("settings") == settings]
    with tempfile.TemporaryDirectory(prefix="atu_corpora_") as work:
        for corpus in args.corpora:
            model_dir, files = build_corpus(corpus, args.quick, Path(work))
            names = yaml.safe_load(Path(files["concepts"]).read_text())["concepts"]
            for people in args.people:
                forget = [c["name"] for c in names[:people]]
                for seed in args.seeds:
                    for method in args.methods:
                        key = (corpus, people, seed, method)
                        if any((r["corpus"], r["people"], r["seed"], r["method"]) == key for r in runs):
                            continue
                        print(f"{corpus}: {people} people, {method}, seed {seed} ...", flush=True)
                        r = one_run(model_dir, files, forget, method, seed, args.device, settings)
                        r.update(corpus=corpus, settings=settings)
                        runs.append(r)
                        shown = {k: round(v, 3) for k, v in r["ratios"].items() if v is not None}
                        print(f"  met={r['met']} {json.dumps(shown)}")
                        _save(json_path, args.quick, runs)
    md = write_tables(args.out_dir / f"{args.name}.md", runs, args.quick)
    print(md)
    return {"runs": runs}


def combine(files: list[Path], settings: dict) -> list[dict]:
    """The runs of ``files`` made at ``settings`` (a later file's run replaces an earlier one of the same corpus,
    people, seed and method); raises SystemExit naming what is missing when none is."""
    found: dict[tuple, dict] = {}
    skipped = 0
    for f in files:
        for r in json.loads(Path(f).read_text())["runs"]:
            if r.get("settings") != settings:
                skipped += 1
                continue
            found[(r["corpus"], r["people"], r["seed"], r["method"])] = r
    if skipped:
        print(f"left out {skipped} runs made at other settings than this checkout's", flush=True)
    if not found:
        raise SystemExit("no run in those files was made at this checkout's settings")
    return list(found.values())


def write_tables(path: Path, runs: list[dict], quick: bool) -> str:
    """The markdown of ``runs``: the table of medians and the claims; returns the table."""
    md = table(runs)
    path.write_text(
        "# Generality: after/before ratios (medians over seeds)\n\n"
        f"Written by `python benchmarks/generality.py{' --quick' if quick else ''}`; a run meets the figures "
        f"when forget <= {FORGET_MAX} of before on direct and on paraphrase or adversarial, retain >= {RETAIN_MIN} "
        f"on every kind and perplexity <= {PPL_MAX}x. Forget cells: the ratio, (the floor: what the model scored "
        "before about people it never saw, over her score), [the share of her score above that floor still there]; "
        "'above floor' counts the seeds that meet the figures with that share in place of the ratio. 'facts' "
        "columns: the same ratio in fact recall (the share of the answer's words that its question does not already "
        "say and that carry a fact), (its floor); [facts] counts the seeds that meet the figures with it.\n\n"
        + md
        + "\n\n## The paper's claim: ATU forgets at least as much as the baseline at an equal retain score\n\n"
        f"Forget: median over seeds of the mean forget ratio over the probe kinds; retain: median of the lowest "
        f"retain ratio. Medians within {EQUAL} count as equal. Every method ran inside the same schedule and retain "
        "budget, each at its own default step.\n\n" + claims(runs) + "\n"
    )
    return md


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
