"""Durability against relearning: how far each setting of relearning-aware unlearning (`unlearn.relearn_rho`) and
of hardening (`harden.noise`) lets relearning bring forgotten facts back, on the embedded world.

For every rho, noise and seed: ATU at the demo's settings with ``unlearn.relearn_rho`` and ``harden.noise`` set
(forgetting the world's first ``--people``), then the relearning attack of
`benchmarks/robustness.py` (K steps of Adam at lr 3e-4 on half of her facts' texts). Two measurements:

- **training side** (what a setting is chosen on): next-token loss on her corpus texts about the facts NOT relearned
  (training texts, never probes), for the original, the unlearned and the relearned model, and its recovery
  ``(unlearned - relearned) / (unlearned - original)``: the share of the loss unlearning added that relearning takes
  away;
- **evaluation** (reported, never chosen on): ROUGE-L recall of her held-out probes, recovery as in
  `atu attack relearn`, and the forget / retain ratios at fp32.

    python benchmarks/relearn_aware.py --rho 0 0.001 0.003 --seeds 0 1 2     # about 6 min per run, 2 CPU cores
    python benchmarks/relearn_aware.py --rho 0 --noise 0 0.6 --seeds 0 1 2  # hardening off and on
    python benchmarks/relearn_aware.py --export demo_out/export --noise 0 0.3 0.6   # harden one export, no rerun
    python benchmarks/relearn_aware.py --quick                              # the tiny world, one rho, one seed
    python benchmarks/relearn_aware.py --paths demo_out/export --name relearn_paths   # which parameters relearn

Writes DIR/relearn_aware.json and DIR/relearn_aware.md (default DIR: results). Every figure is measured on this run.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from atu import __version__, formats
from atu.attack.relearn import (
    RelearnConfig,
    default_relearn_texts,
    held_out_fact_texts,
    loss_recovery,
    recovery,
    relearn,
    text_loss,
)
from atu.attack.runs import mean_of_kinds, relearn_groups
from atu.evaluation.probes import answer_probes, mean_recall_by_kind
from atu.harden import HardenConfig
from atu.hidden import decoder_layers
from atu.loading import load_lm
from atu.run import run as run_atu
from atu.run_config import RunConfig, demo_settings
from atu.run_data import load_run_data
from atu.steps import distil_unlearned, schedule_inputs
from atu.world.build import WORLD_FILES, build_world
from atu.world.config import WorldConfig

RELEARN_LR = 3e-4  # as benchmarks/robustness.py: the world model's own final training rate


def recall_groups(model, tokenizer, probes, groups: dict) -> dict:
    keyed = [p for p in probes if any((p.concept, p.question) in g for g in groups.values())]
    rows = answer_probes(model, tokenizer, keyed)
    return {
        name: mean_of_kinds(mean_recall_by_kind([r for r in rows if (r["concept"], r["question"]) in keys]))
        for name, keys in groups.items()
    }


def one_run(rho: float, seed: int, tiny: bool, steps: int, attacker_steps: int = 1, noise: float = 0.0,
            people: int = 1) -> dict:  # fmt: skip
    world = build_world(WorldConfig.tiny() if tiny else WorldConfig())
    forget = world.concepts().names()[:people]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atu_rl_") as out:
        raw = {**demo_settings(people, tiny), "data": {"forget": forget}, "out": out, "device": "cpu"}
        raw["unlearn"] = {**raw.get("unlearn", {}), "seed": seed, "relearn_rho": rho, "relearn_steps": attacker_steps}
        if noise:
            raw["harden"] = {"enabled": True, "noise": noise}
        summary = run_atu(RunConfig.from_dict(raw, "benchmark config"), progress=False, export=True)
        unlearned, tokenizer = load_lm(Path(summary["export"]) / "model")
    head = {"rho": rho, "attacker_steps": attacker_steps, "harden_noise": noise, "people": people,
            "harden": summary.get("harden"), "seed": seed, "stages": len(summary["stages"]),
            "stop_reason": summary["stop_reason"], "unlearn_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    return _reported(head, measure(world, forget, unlearned, tokenizer, steps))


def measure(world, forget: list[str], unlearned, tokenizer, steps: int) -> dict:
    """The relearning attack on ``unlearned``: the training-side losses and the probes' recall, of the original, the
    unlearned and the relearned model."""
    original, _ = load_lm(world.model_dir)
    corpus = formats.read_corpus(world.path("corpus.jsonl"))
    probes = formats.read_probes(world.path("probes.jsonl"))
    given = default_relearn_texts(corpus, probes, forget[0])
    held, held_answers = held_out_fact_texts(corpus, probes, forget, given)
    groups = relearn_groups(probes, forget, forget[0], given)
    groups = {
        "held_out": groups["held_out"],
        "given": groups["given"],
        "her": groups["held_out"] | groups["given"],
        "retain": groups["retain"],
    }
    relearned, _ = relearn(copy.deepcopy(unlearned), tokenizer, given, RelearnConfig(steps=steps, lr=RELEARN_LR))
    models = {"original": original, "unlearned": unlearned, "relearned": relearned}
    nll = {name: text_loss(m, tokenizer, held) for name, m in models.items()}
    answer_nll = {name: text_loss(m, tokenizer, held, held_answers) for name, m in models.items()}
    recall = {name: recall_groups(m, tokenizer, probes, groups) for name, m in models.items()}
    return {
        "held_out_texts": len(held),
        "nll": nll,
        "nll_recovery": loss_recovery(*(nll[k] for k in ("original", "unlearned", "relearned"))),
        "answer_nll": answer_nll,
        "answer_nll_recovery": loss_recovery(*(answer_nll[k] for k in ("original", "unlearned", "relearned"))),
        "recall": recall,
        "recovery": recovery(*(recall[n]["held_out"] for n in ("original", "unlearned", "relearned"))),
        "forget_ratio": _div(recall["unlearned"]["her"], recall["original"]["her"]),
        "retain_ratio": _div(recall["unlearned"]["retain"], recall["original"]["retain"]),
    }


def _reported(head: dict, measured: dict) -> dict:
    out = {**head, **measured}
    print(
        f"rho {out['rho']} x{out['attacker_steps']} noise {out['harden_noise']} people {out['people']} seed "
        f"{out['seed']}: loss recovery {_f(out['nll_recovery'])}, answers {_f(out['answer_nll_recovery'])}, "
        f"probe recovery {_f(out['recovery'])}, forget {_f(out['forget_ratio'])}, retain {_f(out['retain_ratio'])}, "
        f"hardening's held-out perplexity rise {_rise(out.get('harden'))} ({out['unlearn_seconds']} s)",
        flush=True,
    )
    return out


def harden_export(export: Path, noise: float, steps: int, harden_steps: int | None = None) -> dict:
    """``export``'s model (a run of the demo's settings) hardened at ``noise`` on the retain texts its run would
    distil on, then attacked; noise 0: the export as it is."""
    manifest = json.loads((export / "manifest.json").read_text())
    cfg = RunConfig.from_dict({**manifest["training_config"], "device": "cpu"}, "the export's config")
    world = build_world(WorldConfig.tiny() if cfg.model == "world:tiny" else WorldConfig())
    unlearned, tokenizer = load_lm(export / "model")
    t0, record = time.perf_counter(), None
    if noise:
        data = load_run_data(cfg, {k: str(world.path(v)) for k, v in WORLD_FILES.items()})
        steps_ = harden_steps or cfg.harden.steps
        cfg.harden = HardenConfig(**{**cfg.harden.to_dict(), "enabled": True, "noise": noise, "steps": steps_})
        unlearned, record = distil_unlearned(cfg, data, schedule_inputs(cfg, data), unlearned, tokenizer)
    forget = cfg.data.forget
    head = {"rho": cfg.unlearn.relearn_rho, "attacker_steps": cfg.unlearn.relearn_steps, "harden_noise": noise,
            "people": len(forget), "harden": record, "seed": cfg.unlearn.seed, "export": str(export),
            "stages": None, "stop_reason": manifest["eval_summary"].get("stop_reason"),  # no stage count in an export
            "unlearn_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    return _reported(head, measure(world, forget, unlearned, tokenizer, steps))


def _div(a, b):
    return a / b if a is not None and b else None


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _rise(record: dict | None) -> str:
    rise = (record or {}).get("check_ppl_rise")
    return "-" if rise is None else f"{rise:+.1%}"


def write_markdown(runs: list[dict], path: Path) -> None:
    lines = [
        "| rho | harden.noise | people | seed | stages "
        "| training side: held-out facts' texts, loss orig / unl / relearned | loss recovery "
        "| their answers' loss orig / unl / relearned | answer-loss recovery "
        "| probes: held-out recall orig / unl / relearned | probe recovery | forget ratio | retain ratio "
        "| held-out perplexity rise from hardening | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        n, a, rc = r["nll"], r.get("answer_nll"), r["recall"]
        answers = f"{a['original']:.2f} / {a['unlearned']:.2f} / {a['relearned']:.2f}" if a else "-"
        lines.append(
            f"| {r['rho']} x{r.get('attacker_steps', 1)} | {r.get('harden_noise', 0)} | {r.get('people', 1)} "
            f"| {r['seed']} | {'-' if r['stages'] is None else r['stages']} "
            f"| {n['original']:.2f} / {n['unlearned']:.2f} / "
            f"{n['relearned']:.2f} | {_f(r['nll_recovery'])} | {answers} | {_f(r.get('answer_nll_recovery'))} "
            f"| {_f(rc['original']['held_out'])} / "
            f"{_f(rc['unlearned']['held_out'])} / {_f(rc['relearned']['held_out'])} | {_f(r['recovery'])} "
            f"| {_f(r['forget_ratio'])} | {_f(r['retain_ratio'])} | {_rise(r.get('harden'))} "
            f"| {r['unlearn_seconds']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def recovery_paths(export: Path, steps: int) -> dict:
    """Where relearning brings her facts back through: the export relearned as the attack does, with only one group
    of parameters allowed to move (the others' gradients zeroed), and the answer-loss recovery of each."""
    hook = json.loads((export / "guard" / "guard.json").read_text())["hook_layer"]
    world = build_world(WorldConfig())
    unlearned, tokenizer = load_lm(export / "model")
    original, _ = load_lm(world.model_dir)
    concept = world.concepts().names()[0]
    corpus, probes = formats.read_corpus(world.path("corpus.jsonl")), formats.read_probes(world.path("probes.jsonl"))
    given = default_relearn_texts(corpus, probes, concept)
    held, answers = held_out_fact_texts(corpus, probes, [concept], given)
    before, after = text_loss(original, tokenizer, held, answers), text_loss(unlearned, tokenizer, held, answers)

    def names(module) -> set[str]:
        return {n for n, p in unlearned.named_parameters() if any(p is q for q in module.parameters())}

    layers = decoder_layers(unlearned)
    lower = set().union(*(names(m) for m in layers[:hook]))
    embeddings = names(unlearned.get_input_embeddings())
    groups = {
        "every parameter": None,
        f"decoder layers 0-{hook - 1} (what ATU trains)": lower,
        f"decoder layers {hook}-{len(layers) - 1}, the final norm and an untied head": {
            n for n, _ in unlearned.named_parameters() if n not in lower | embeddings
        },
        "input embeddings (tied to the head here)": embeddings,
    }
    out = {"export": str(export), "hook_layer": hook, "answer_nll": {"original": before, "unlearned": after},
           "groups": {}}  # fmt: skip
    for name, moving in groups.items():
        model = copy.deepcopy(unlearned)
        hooks = [
            p.register_hook(torch.zeros_like)
            for n, p in model.named_parameters()
            if moving is not None and n not in moving
        ]
        relearned, _ = relearn(model, tokenizer, given, RelearnConfig(steps=steps, lr=RELEARN_LR))
        for h in hooks:
            h.remove()
        loss = text_loss(relearned, tokenizer, held, answers)
        out["groups"][name] = {"answer_nll": loss, "recovery": loss_recovery(before, after, loss)}
        print(f"{name}: answer loss {loss:.2f}, recovery {_f(out['groups'][name]['recovery'])}", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rho", type=float, nargs="+", default=[0.0, 1e-3, 3e-3])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0], help="harden.noise (0: no hardening)")
    ap.add_argument("--harden-steps", type=int, help="with --export: harden.steps (default: the config's)")
    ap.add_argument("--people", type=int, default=1, help="forget the world's first N people")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=10, help="relearning steps K of the attack")
    ap.add_argument("--attacker-steps", type=int, default=1, help="unlearn.relearn_steps")
    ap.add_argument("--quick", action="store_true", help="the tiny world, rho 0.001, seed 0")
    ap.add_argument("--out-dir", default="results")
    ap.add_argument("--name", default="relearn_aware")
    ap.add_argument("--paths", type=Path, metavar="EXPORT", help="only: which parameters relearning goes through")
    ap.add_argument(
        "--export",
        type=Path,
        help="harden this export (of the demo's settings) at each --noise, without unlearning again",
    )
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.paths:
        paths = recovery_paths(args.paths, args.steps)
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.out_dir) / f"{args.name}.json").write_text(json.dumps(paths, indent=1))
        return paths
    rhos, seeds = ([1e-3], [0]) if args.quick else (args.rho, args.seeds)
    result = {
        "atu_version": __version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "tiny": args.quick,
        "relearn": {"steps": args.steps, "lr": RELEARN_LR},
        "runs": [],
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(r, n, seed) for seed in seeds for r in rhos for n in args.noise]
    if args.export:
        todo = [(None, n, None) for n in args.noise]
    for rho, noise, seed in todo:
        if args.export:
            result["runs"].append(harden_export(args.export, noise, args.steps, args.harden_steps))
        else:
            result["runs"].append(one_run(rho, seed, args.quick, args.steps, args.attacker_steps, noise, args.people))
        # written after every run: a long sweep that stops part way keeps what it measured
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        write_markdown(result["runs"], out / f"{args.name}.md")
    return result


if __name__ == "__main__":
    main()
