"""The `atu` command line. Library errors (AtuError) print as one line and exit with status 1."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from atu import __version__
from atu.cli_errors import friendly
from atu.errors import ConfigError
from atu.formats import PROBE_KINDS


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        logging.getLogger().setLevel(logging.INFO)


def _verbose_option() -> click.Option:
    """-v/--verbose, accepted by the group and by every command (`atu serve -v` as well as `atu -v serve`)."""
    return click.Option(
        ["-v", "--verbose"], is_flag=True, expose_value=False, callback=_set_verbose, help="Log progress details."
    )


def _add_verbose(command: click.Command) -> None:
    if not any("--verbose" in p.opts for p in command.params):
        command.params.append(_verbose_option())
    for sub in getattr(command, "commands", {}).values():
        _add_verbose(sub)


STRICT_EXIT = 3  # `atu run --strict` when a criterion is missed (1 is a user error, 2 click's usage error)
_SET_HELP = "Override a config key, as key.sub=value (the value is YAML: 3e-4, [0.9,0.5], null); repeatable."


@click.group()
@click.version_option(__version__, "--version", prog_name="atu", message="%(prog)s %(version)s")
def main() -> None:
    """Align-then-Unlearn: make a language model forget chosen concepts, export it for vLLM, guard the endpoint."""
    # No level here: -v (on the group or on a command) sets the root logger's level, WARNING otherwise.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")


@main.group()
def world() -> None:
    """The embedded world: fictional people, probes about them, and a small Llama that knows them."""


def _world_config(config: Path | None, tiny: bool, seed: int | None, people: int | None, sets=()):
    from atu.config_tools import apply_overrides, read_yaml
    from atu.world.config import WorldConfig

    if config is not None and tiny:
        raise ConfigError("--config and --tiny both choose a world config; pass one of them")
    raw = read_yaml(config) if config else (WorldConfig.tiny().to_dict() if tiny else {})
    try:
        cfg = WorldConfig.from_dict(apply_overrides(raw, sets))
    except ConfigError as e:
        raise ConfigError(f"{config}: {e}" if config else str(e)) from None
    if seed is not None:
        cfg.seed = seed
    if people is not None:
        cfg.n_people = people
    cfg.__post_init__()
    return cfg


@world.command("build")
@click.option(
    "--config",
    "config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML world config (keys of WorldConfig: seed, n_people, n_unseen, tokenizer, lm, train).",
)
@click.option(
    "--from",
    "source",
    type=click.Path(path_type=Path),
    help="Your own world: a directory with corpus.jsonl, probes.jsonl, concepts.yaml.",
)
@click.option("--tiny", is_flag=True, help="A few people and a 2-layer model trained for seconds (for trying things).")
@click.option("--seed", type=int, help="Generator seed (overrides the config).")
@click.option("--people", type=int, help="Number of people (overrides the config).")
@click.option("--force", is_flag=True, help="Rebuild even if a cached build exists.")
@click.option("--eval/--no-eval", "run_eval", default=True, help="Score the model on its probes after building.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option(
    "--run-config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a run config for this world (its model and files, answers as long as its longest answer).",
)
@click.option("--forget", multiple=True, help="With --run-config: a concept to forget (repeatable).")
@friendly
def world_build(config, source, tiny, seed, people, force, run_eval, sets, run_config, forget) -> None:
    """Generate the world (or read yours), train its tokenizer and model, cache them, and print the cache path."""
    from atu.world.build import build_world

    cfg = _world_config(config, tiny, seed, people, sets)
    t0 = time.time()
    built = build_world(cfg, source=source, force=force)
    click.echo(f"world: {built.root}  ({time.time() - t0:.1f}s; build took {built.build_info()['build_seconds']}s)")
    if run_config is not None:
        import yaml

        from atu.qa import world_run_config

        raw = world_run_config(built.root, list(forget) or None)
        run_config.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
        click.echo(f"wrote {run_config} (forgets {', '.join(raw['data']['forget'])}; `atu run {run_config}`)")
    if run_eval:
        _print_probe_table(built)


def _print_probe_table(built) -> dict:
    from atu.evaluation.probes import answer_probes, mean_recall_by_kind
    from atu.loading import load_lm

    model, tokenizer = load_lm(built.model_dir)
    rows = answer_probes(model, tokenizer, built.probes(), progress=True)
    scores = mean_recall_by_kind(rows)
    click.echo(f"{'probe kind':<14}{'n':>6}{'ROUGE-L recall':>16}")
    for kind, value in scores.items():
        n = sum(r["kind"] == kind for r in rows)
        click.echo(f"{kind:<14}{n:>6}{'-' if value is None else f'{value:.3f}':>16}")
    return scores


def _verdict(criteria: list[dict], value_format: str) -> str:
    """ "all met", or "missed" and each missed criterion with its value."""
    missed = [c for c in criteria if not c["met"]]
    if not missed:
        return "all met"
    return "missed " + "; ".join(f"{c['name']} {c['value']:{value_format}}" for c in missed)


def _print_before_after(summary: dict, bounds=None) -> list[dict]:
    """Print the before/after table and the criteria (``bounds``: the run's EvalConfig, default the project's
    figures); return every criterion checked."""
    from atu.run_config import EvalConfig

    bounds = bounds or EvalConfig()
    before, after = summary.get("before"), summary.get("after")
    if not before or not after:
        return []
    click.echo(f"\n{'group':<10}{'kind':<13}{'before':>8}{'after':>8}{'after/before':>14}")
    for group in ("forget", "neighbour", "retain"):
        for kind in PROBE_KINDS:
            b, a = before[group].get(kind), after[group].get(kind)
            if b is None or a is None:
                continue
            ratio = f"{a / b:.2f}" if b else "-"
            click.echo(f"{group:<10}{kind:<13}{b:>8.3f}{a:>8.3f}{ratio:>14}")
    b, a = before["retain_perplexity"], after["retain_perplexity"]
    if b and a:
        click.echo(f"{'retain':<10}{'perplexity':<13}{b:>8.1f}{a:>8.1f}{a / b:>14.2f}")
    floor = before.get("forget_floor")
    if floor:
        cells = []
        for kind in PROBE_KINDS:
            f, b = floor.get(kind), before["forget"].get(kind)
            if f is not None and b:
                cells.append(f"{kind} {f:.3f} ({f / b:.2f} of before)")
        click.echo("forget floor, the same probes about people the model never saw: " + ", ".join(cells))
    _print_facts(before, after)
    from atu.evaluation.metrics import REFOUND_SHARE, similarity_criteria, unlearning_criteria

    unlearning = unlearning_criteria(before, after, **bounds.bounds())
    click.echo(
        f"criteria (forget <= {bounds.forget_ratio:.2f} of before, retain >= {bounds.retain_ratio:.2f}, perplexity <= "
        f"{bounds.perplexity_ratio:.2f}x, fluency drop <= {bounds.fluency_drop:.2f}): " + _verdict(unlearning, ".2f")
    )
    similarity = similarity_criteria(
        summary.get("similarity", {}), summary["final_thresholds"], summary["forget"], shift=bounds.similarity_shift
    )
    if similarity:
        click.echo(
            "predictors (re-aligned: forget-minus-retain cosine <= "
            f"{REFOUND_SHARE} of before; driving: mean cosine on forget texts < final threshold, on retain texts "
            f"within {bounds.similarity_shift:.2f} of before): " + _verdict(similarity, "+.3f")
        )
    forgetting = summary.get("forgetting") or {}
    if forgetting:
        state = "FAILED, " if forgetting["failed"] else ""
        click.echo(f"forgetting ({forgetting['schedule']} schedule): {state}{forgetting['why']}")
    click.echo(f"schedule: {summary['stop_reason']}")
    return unlearning + similarity


def _print_facts(before: dict, after: dict) -> None:
    """The forget probes' fact recall (the answer's words that its question does not already say), before and after,
    with its floor: a second reading where ROUGE-L rewards repeating the answer's sentence frame."""
    facts_b, facts_a = before.get("facts") or {}, after.get("facts") or {}
    floor = facts_b.get("forget_floor") or {}
    cells = []
    for kind in PROBE_KINDS:
        b, a = (facts_b.get("forget") or {}).get(kind), (facts_a.get("forget") or {}).get(kind)
        if b is not None and a is not None:
            f = floor.get(kind)
            shown = (f"{a / b:.2f}" if b else "-") + ("" if f is None or not b else f"; floor {f / b:.2f}")
            cells.append(f"{kind} {b:.3f} -> {a:.3f} ({shown})")
    if cells:
        click.echo("forget fact recall (answer words the question does not say), of before: " + ", ".join(cells))


def _config_and_run_dir(fn):
    """The CONFIG argument and the --out and --set options of the commands that run (part of) the job."""
    fn = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)(fn)
    fn = click.option(
        "--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (overrides the config)."
    )(fn)
    return click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))(fn)


@main.command("run")
@_config_and_run_dir
@click.option("--no-export", is_flag=True, help="Align and unlearn, evaluate, but write no export.")
@click.option(
    "--strict",
    is_flag=True,
    help=f"Exit with status {STRICT_EXIT} when a criterion (the config's eval section) is missed or none could be "
    "checked (no probes): a gate for pipelines.",
)
@friendly
def run_cmd(config: Path, out: Path | None, sets: tuple[str, ...], no_export: bool, strict: bool) -> None:
    """Align, unlearn, export and evaluate, as CONFIG (YAML) says. A killed run resumes from its last stage."""
    from atu.run import run

    cfg = _load_config(config, out, sets)
    summary = run(cfg, export=not no_export)
    if summary is None:  # not the first process of a data-parallel run: that one reports
        return
    criteria = _print_before_after(summary, cfg.eval)
    click.echo(f"wrote {Path(cfg.out) / 'eval.json'}" + (f" and {summary['export']}" if "export" in summary else ""))
    if strict:
        missed = [c["name"] for c in criteria if not c["met"]]
        if not criteria:
            click.echo("strict: no criterion could be checked (the run has no probes: set data.probes)", err=True)
            sys.exit(STRICT_EXIT)
        if missed:
            click.echo(f"strict: {len(missed)} of {len(criteria)} criteria missed: {'; '.join(missed)}", err=True)
            sys.exit(STRICT_EXIT)
        click.echo(f"strict: all {len(criteria)} criteria met")


def _load_config(config: Path, out: Path | None, sets: tuple[str, ...] = ()):
    from atu.run_config import RunConfig

    cfg = RunConfig.load(config, sets)
    if out is not None:
        cfg.out = str(out)
    return cfg


@main.command("align")
@_config_and_run_dir
@friendly
def align_cmd(config: Path, out: Path | None, sets: tuple[str, ...]) -> None:
    """Align the embedding predictor to the model (LM frozen); `atu unlearn` and `atu run` of CONFIG reuse it."""
    from atu.run import align

    cfg = _load_config(config, out, sets)
    metrics = align(cfg)
    if metrics is None:  # not the first process of a data-parallel run
        return
    click.echo(
        f"aligned: train cos {metrics['train_cos']:.3f}, validation cos {metrics['val_cos']:.3f}"
        + (" (reused)" if metrics.get("reused") else f", {metrics['windows']} windows")
    )
    click.echo(f"wrote {Path(cfg.out) / 'aligned'}")


@main.command("unlearn")
@_config_and_run_dir
@friendly
def unlearn_cmd(config: Path, out: Path | None, sets: tuple[str, ...]) -> None:
    """Run the unlearning schedule of CONFIG (aligning first unless `atu align` did); no evaluation, no export."""
    from atu.run import unlearn

    cfg = _load_config(config, out, sets)
    summary = unlearn(cfg)
    if summary is None:
        return
    click.echo(f"schedule: {summary['stop_reason']}")
    click.echo(f"wrote {summary['unlearned']}; `atu export {config}` packages it for vLLM")


@main.command("export")
@_config_and_run_dir
@click.option(
    "--to", "dest", type=click.Path(file_okay=False, path_type=Path), help="Export here (default: RUN/export)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing export at --to.")
@friendly
def export_cmd(config: Path, out: Path | None, sets: tuple[str, ...], dest: Path | None, overwrite: bool) -> None:
    """Export what `atu unlearn CONFIG` left: the model for `vllm serve`, the predictor and the concept index."""
    from atu.run import export_unlearned

    cfg = _load_config(config, out, sets)
    click.echo(f"wrote {export_unlearned(cfg, dest, overwrite=overwrite)}")


def _print_eval(ev: dict) -> None:
    click.echo(f"{'group':<10}{'direct':>10}{'paraphrase':>12}{'adversarial':>13}{'probes':>8}")
    for group in ("forget", "neighbour", "retain"):
        vals = [ev[group].get(k) for k in PROBE_KINDS]
        cells = "".join(f"{'-' if v is None else f'{v:.3f}':>{w}}" for v, w in zip(vals, (10, 12, 13)))
        click.echo(f"{group:<10}{cells}{ev['n_probes'][group]:>8}")

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    click.echo(
        f"retain perplexity {fmt(ev['retain_perplexity'])}   fluency forget {fmt(ev['fluency']['forget'])} "
        f"retain {fmt(ev['fluency']['retain'])}   leakage AUROC {fmt(ev['leakage_auroc'])}   "
        f"MIA AUROC {fmt(ev['mia_auroc'])}"
    )


@main.command("eval")
@click.argument("target")
@click.option(
    "--world",
    "world_kind",
    type=click.Choice(["default", "tiny"]),
    help="Take the data files from the embedded world.",
)
@click.option("--probes", type=click.Path(exists=True, dir_okay=False), help="probes.jsonl")
@click.option("--concepts", type=click.Path(exists=True, dir_okay=False), help="concepts.yaml")
@click.option("--corpus", type=click.Path(exists=True, dir_okay=False), help="corpus.jsonl (leakage, MIA)")
@click.option("--heldout", type=click.Path(exists=True, dir_okay=False), help="held-out texts (perplexity)")
@click.option("--unseen", type=click.Path(exists=True, dir_okay=False), help="never-trained texts (MIA)")
@click.option("--forget", "forget", multiple=True, help="A forgotten concept (repeatable); default: the export's.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON here.")
@click.option("--device", default="cpu", show_default=True)
@friendly
def eval_cmd(target, world_kind, probes, concepts, corpus, heldout, unseen, forget, out, device) -> None:
    """Evaluate TARGET (a model id or path, or an export) on probes: forget/neighbour/retain recall and more."""
    from atu.evaluation.target import EvalData, evaluate_target, world_eval_data

    if world_kind:
        data = world_eval_data(tiny=world_kind == "tiny")
    elif probes and concepts:
        data = EvalData(probes, concepts, corpus, heldout, unseen)
    else:
        raise ConfigError("give --probes and --concepts (and optionally --corpus, --heldout, --unseen), or --world")
    ev = evaluate_target(target, data, list(forget) or None, device=device)
    _print_eval(ev)
    if out:
        out.write_text(json.dumps(ev, indent=1, sort_keys=True) + "\n")
        click.echo(f"wrote {out}")


@main.command("verify")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@friendly
def verify_cmd(export_dir: Path) -> None:
    """Check an export: every file's sha256 against the manifest, and the dimensions of model, predictor, index."""
    from atu.export import load_export

    exp = load_export(export_dir)
    g = exp.guard
    click.echo(
        f"ok: {export_dir}: hook layer {g.hook_layer}/{g.num_layers}, hidden {g.hidden_size}, "
        f"embedding {g.embedding_dim}, {len(exp.index)} concepts, {len(exp.manifest['files'])} files verified"
    )


def _check_vllm(
    export_dir: Path,
    probes: Path | None,
    count: int,
    base_url: str | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
) -> list[dict]:
    from atu.formats import read_probes
    from atu.vllm_check import compare_with_transformers

    if probes:
        questions = [p.question for p in read_probes(probes)][:count]
    else:
        questions = ["Where was the author born?", "Who wrote it?", "Hello", "Tell me a fact.", "What is it?"][:count]
    return compare_with_transformers(
        export_dir / "model", questions, base_url=base_url, model_name=model_name, api_key=api_key
    )


@main.command("check-vllm")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--probes", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Questions (probes.jsonl)."
)
@click.option("-n", "count", default=5, show_default=True, help="How many questions to compare.")
@friendly
def check_vllm_cmd(export_dir: Path, probes: Path | None, count: int) -> None:
    """Serve EXPORT/model with a real vLLM server and compare greedy outputs with transformers."""
    rows = _check_vllm(export_dir, probes, count)
    for r in rows:
        click.echo(
            f"{'same' if r['equal'] else 'DIFF'}  {r['question'][:50]!r}: vllm={r['vllm']!r} "
            f"transformers={r['transformers']!r}"
        )
    equal = sum(r["equal"] for r in rows)
    click.echo(f"{equal}/{len(rows)} greedy outputs equal")
    if equal != len(rows):
        sys.exit(1)


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo_out"),
    show_default=True,
    help="Directory for the run, the export and eval.json.",
)
@click.option("--forget", "n_forget", default=1, show_default=True, help="How many people to forget.")
@click.option("--tiny", is_flag=True, help="Use the tiny world (seconds instead of minutes).")
@click.option(
    "--vllm/--no-vllm",
    "use_vllm",
    default=True,
    help="Serve the export with `atu serve` (vLLM + guard): compare with transformers, ask through the guard.",
)
@friendly
def demo(out: Path, n_forget: int, tiny: bool, use_vllm: bool) -> None:
    """The whole job on the embedded world: build it (cached), forget people, export, evaluate, serve it with vLLM
    behind the guard."""
    from atu.run import run
    from atu.run_config import RunConfig, demo_settings
    from atu.world.build import build_world
    from atu.world.config import WorldConfig

    click.echo("building the embedded world (cached after the first run)...")
    built = build_world(WorldConfig.tiny() if tiny else WorldConfig())
    info = built.build_info()
    click.echo(f"world: {built.root}\n  {info['parameters']:,} parameters, built in {info['build_seconds']}s")
    names = built.concepts().names()[:n_forget]
    click.echo(f"forgetting: {', '.join(names)}")
    raw = demo_settings(n_forget, tiny)  # configs/world.yaml (one person) or configs/world_three.yaml (more)
    raw.update(data={"forget": names}, out=str(out))
    summary = run(RunConfig.from_dict(raw, "demo config"), replace_stale=True)
    _print_before_after(summary)
    if use_vllm:
        _demo_serve(Path(summary["export"]), built, names, out, summary)
        (out / "eval.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    click.echo(f"\nexport: {summary['export']}\nevaluation: {out / 'eval.json'}")


def _demo_serve(export: Path, built, names: list[str], out: Path, summary: dict) -> None:
    """Serve the export through `atu serve`, check vLLM against transformers, ask questions through the guard."""
    from atu.formats import read_probes
    from atu.vllm_check import free_port
    from serve.demo import ask_through_guard, atu_serve, format_rows

    click.echo("\nserving the export: `atu serve` starts vLLM (CPU, about a minute) and the guard in front of it...")
    probes = read_probes(built.path("probes.jsonl"))
    direct = [p for p in probes if p.kind == "direct"]
    others = [n for n in built.concepts().names() if n not in names][:2]
    asked = [("forgotten", p.question) for p in direct if p.concept in names][:3]
    asked += [("other", p.question) for n in others for p in [q for q in direct if q.concept == n][:2]]
    audit = out / "audit.sqlite"
    # The demo is the operator's own client: it asks for the full annotation to print it side by side.
    with atu_serve(export, free_port(), "--audit", str(audit), "--disclose", "full") as served:
        click.echo(f"  vLLM  {served.vllm_url}  (model {served.model_name!r})\n  guard {served.guard_url}/v1")
        click.echo("greedy outputs, vLLM against transformers:")
        rows = _check_vllm(export, built.path("probes.jsonl"), 5, base_url=served.vllm_url,
                           model_name=served.model_name, api_key=served.vllm_key)  # fmt: skip
        for r in rows:
            click.echo(f"  {'same' if r['equal'] else 'DIFF'}  {r['question'][:60]!r} -> {r['vllm'].strip()!r}")
        click.echo("\nthrough the guard (OpenAI client, chat, monitor policy):")
        guard_rows = ask_through_guard(served, asked)
        click.echo(format_rows(guard_rows))
    click.echo(f"guard and vLLM stopped; audit log: {audit}")
    summary["vllm_check"] = rows
    summary["guard_demo"] = guard_rows


@main.group("data")
def data_group() -> None:
    """Bring your own data: turn it into the files `atu world build --from` and `atu run` read."""


@data_group.command("import-qa")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory to write.")
@click.option("--question-column", default="question", show_default=True)
@click.option("--answer-column", default="answer", show_default=True)
@click.option("--subject-column", default="subject", show_default=True, help="The concept each pair is about.")
@click.option("--split", default="train", show_default=True, help="For a datasets directory with splits.")
@click.option(
    "--template",
    default=None,
    help="How a pair becomes training text, with {question}, {answer}, {subject} (default: 'Q: {question}\\nA: "
    "{answer}', the small model's chat form).",
)
@click.option("--heldout-template", default=None, help="The held-out phrasing (default: '{question} {answer}').")
@friendly
def data_import_qa(source, out, question_column, answer_column, subject_column, split, template, heldout_template):
    """Turn a QA dataset (SOURCE: .jsonl, .csv, or a local Hugging Face datasets directory) into corpus.jsonl,
    probes.jsonl, heldout.jsonl and concepts.yaml in OUT, ready for `atu world build --from OUT`."""
    from atu.qa import HELDOUT_TEMPLATE, QA_TEMPLATE, Columns, read_qa, write_qa_world

    pairs = read_qa(source, Columns(question_column, answer_column, subject_column), split)
    write_qa_world(pairs, out, template=template or QA_TEMPLATE, heldout_template=heldout_template or HELDOUT_TEMPLATE)
    subjects = len({p.subject for p in pairs})
    click.echo(f"wrote {out}: {len(pairs)} pairs about {subjects} subjects")


@main.group("config")
def config_group() -> None:
    """Run configs: print one resolved, or the reference of every key."""


@config_group.command("show")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@friendly
def config_show(config: Path, sets: tuple[str, ...]) -> None:
    """Print CONFIG resolved: every key, defaults filled in, values as they will be used, one line of help each."""
    from atu.config_tools import show
    from atu.run_config import RunConfig

    cfg = RunConfig.load(config, sets)
    click.echo(f"# {config}" + "".join(f" --set {s}" for s in sets))
    click.echo(show(RunConfig, cfg), nl=False)


@config_group.command("reference")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here (else print).")
@friendly
def config_reference(out: Path | None) -> None:
    """The Markdown reference of every key of the run and world configs (docs/config.md)."""
    from atu.config_tools import reference, reference_sections

    text = reference(reference_sections())
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"wrote {out}")


def _register_commands() -> None:
    """Commands that live in their own modules (the serving ones import the serve package only when run)."""
    from atu.cli_attack import attack
    from atu.cli_serve import serve_cmd
    from serve.audit_report import audit_command

    for command in (serve_cmd, attack, audit_command):
        main.add_command(command)


_register_commands()
_add_verbose(main)


if __name__ == "__main__":
    main()
