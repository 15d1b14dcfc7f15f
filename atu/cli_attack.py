"""`atu attack`: what an attacker does to an export (quantize it, fine-tune it a few steps), measured against its
original model on the same probes as `atu eval`, with the export's guard scoring the attacked answers."""

from __future__ import annotations

import json
from pathlib import Path

import click

from atu.cli_errors import friendly
from atu.errors import ConfigError


@click.group()
def attack() -> None:
    """Attack an export as a deployment would: quantize it, fine-tune it a few steps; compare with its original."""


def _attack_source(export_dir, world_kind, probes, concepts, corpus, heldout, unseen, original):
    from atu.attack.source import export_source
    from atu.evaluation.target import EvalData, world_eval_data

    data = None
    if world_kind:
        data = world_eval_data(tiny=world_kind == "tiny")
    elif probes and concepts:
        data = EvalData(probes, concepts, corpus, heldout, unseen)
    elif probes or concepts:
        raise ConfigError("give both --probes and --concepts, or neither (the export's manifest names them)")
    return export_source(export_dir, data=data, original=original)


def _attack_options(fn):
    """Where the data and the original model come from when the export's manifest does not say (or to override)."""
    for opt in reversed(
        [
            click.option("--original", help="The model before unlearning (default: the manifest's training model)."),
            click.option("--world", "world_kind", type=click.Choice(["default", "tiny"]), help="The world's data."),
            click.option("--probes", type=click.Path(exists=True, dir_okay=False), help="probes.jsonl"),
            click.option("--concepts", type=click.Path(exists=True, dir_okay=False), help="concepts.yaml"),
            click.option("--corpus", type=click.Path(exists=True, dir_okay=False), help="corpus.jsonl"),
            click.option("--heldout", type=click.Path(exists=True, dir_okay=False), help="held-out texts"),
            click.option("--unseen", type=click.Path(exists=True, dir_okay=False), help="never-trained texts"),
            click.option("--guard/--no-guard", default=True, help="Score the attacked answers with the guard."),
            click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON here."),
        ]
    ):
        fn = opt(fn)
    return click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))(fn)


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _print_guard(label: str, g: dict) -> None:
    for source, r in g.items():
        click.echo(
            f"  guard ({source} states) on {label}: caught {_fmt(r['catch_rate'], '.2f')} of {r['leaks']} leaking "
            f"answers, false flags {_fmt(r['false_flag_rate'], '.3f')} of {r['others']} others; counting the "
            f"question's flags: {_fmt(r.get('exchange_catch_rate'), '.2f')}, "
            f"{_fmt(r.get('exchange_false_flag_rate'))}; "
            f"with the name check (atu serve's default) {_fmt(r.get('names_catch_rate'), '.2f')}, "
            f"{_fmt(r.get('names_false_flag_rate'))}, and the question's flags too "
            f"{_fmt(r.get('names_exchange_catch_rate'), '.2f')}, {_fmt(r.get('names_exchange_false_flag_rate'))}"
        )


@attack.command("quantize")
@_attack_options
@click.option("--bits", type=click.Choice(["8", "4"]), required=True, help="RTN bits (symmetric).")
@click.option("--group-size", type=int, default=None, help="One step per G input columns (default: per channel).")
@click.option("--int8-kernel/--no-int8-kernel", default=True, help="Also run torch's CPU int8 kernels.")
@friendly
def attack_quantize_cmd(export_dir, original, world_kind, probes, concepts, corpus, heldout, unseen, guard, out,
                        bits, group_size, int8_kernel) -> None:  # fmt: skip
    """Quantize EXPORT's model and its original the same way; `atu eval`'s probes on each, and bucket collapse."""
    from atu.attack.quantize import QuantConfig
    from atu.attack.runs import mean_of_kinds, quantize_attack

    src = _attack_source(export_dir, world_kind, probes, concepts, corpus, heldout, unseen, original)
    res = quantize_attack(src, QuantConfig(int(bits), group_size), kernel=int8_kernel, guard=guard, progress=True)
    click.echo(f"{'precision':<26}{'model':<11}{'forget d/p/a':>21}{'neighbour':>11}{'retain':>8}{'forget ratio':>14}"
               f"{'retain ratio':>14}")  # fmt: skip
    for row in res["rows"]:
        for which in ("original", "unlearned"):
            ev = row[which]
            fgt = "/".join(_fmt(ev["forget"][k], ".2f") for k in ("direct", "paraphrase", "adversarial"))
            ratios = ("", "") if which == "original" else (row["ratios"]["forget"], row["ratios"]["retain"])
            click.echo(
                f"{row['precision']:<26}{which:<11}{fgt:>21}{_fmt(mean_of_kinds(ev['neighbour'])):>11}"
                f"{_fmt(mean_of_kinds(ev['retain'])):>8}"
                + "".join(f"{_fmt(r, '.2f') if r != '' else '':>14}" for r in ratios)
            )
        if "guard" in row:
            _print_guard(row["precision"] + " unlearned", row["guard"])
    if res["kernel_error"]:
        click.echo(f"int8 kernel: not run ({res['kernel_error']})")
    s = res["collapse"]["summary"]
    click.echo(
        f"bucket collapse ({QuantConfig(int(bits), group_size).label}): {s['layers_collapsed']} of "
        f"{s['layers_updated']} updated layers collapse; {_fmt(s['flipped'], '.3f')} of the updated weights move to "
        "another bucket than the original's"
    )
    if out:
        out.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
        click.echo(f"wrote {out}")


@attack.command("relearn")
@_attack_options
@click.option(
    "--on",
    "on_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="corpus.jsonl of texts to fine-tune on (default: half of the first forgotten concept's facts).",
)
@click.option("--steps", type=int, default=10, show_default=True, help="Optimizer steps (K).")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Adam learning rate.")
@friendly
def attack_relearn_cmd(export_dir, original, world_kind, probes, concepts, corpus, heldout, unseen, guard, out,
                       on_file, steps, lr) -> None:  # fmt: skip
    """Fine-tune EXPORT's model for K steps on some facts; recall of the facts not given, and how much came back."""
    from atu.attack.relearn import RelearnConfig
    from atu.attack.runs import mean_of_kinds, relearn_attack
    from atu.formats import read_corpus

    src = _attack_source(export_dir, world_kind, probes, concepts, corpus, heldout, unseen, original)
    texts = [r.text for r in read_corpus(on_file)] if on_file else None
    res = relearn_attack(src, RelearnConfig(steps=steps, lr=lr), texts, guard=guard, progress=True)
    click.echo(f"relearned {res['relearned_concept']!r} on {len(res['texts'])} texts for {steps} steps "
               f"(loss {res['loss'][0]:.3f} -> {res['loss'][-1]:.3f})")  # fmt: skip
    click.echo(f"{'facts':<17}{'probes':>7}{'original':>10}{'unlearned':>11}{'relearned':>11}{'recovery':>10}")
    for g in ("given", "held_out", "other_forgotten", "retain"):
        vals = [res["recall"][m][g] for m in ("original", "unlearned", "relearned")]
        cells = "".join(f"{_fmt(mean_of_kinds(v)):>{w}}" for v, w in zip(vals, (10, 11, 11)))
        click.echo(f"{g:<17}{vals[0]['n']:>7}{cells}{_fmt(res['recovery'].get(g), '.2f'):>10}")
    loss = res.get("answer_loss")
    if loss:
        click.echo(f"training side: the held-out facts' answers in {loss['texts']} corpus texts cost "
                   f"{loss['original']:.2f} / {loss['unlearned']:.2f} / {loss['relearned']:.2f} nats a token "
                   f"(original / unlearned / relearned); recovery {_fmt(loss['recovery'], '.2f')}")  # fmt: skip
    if "guard" in res:
        _print_guard("the relearned model", res["guard"])
    if out:
        out.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
        click.echo(f"wrote {out}")
