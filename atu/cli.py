"""The `atu` command line. Library errors (AtuError) print as one line and exit with status 1."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path

import click
import yaml

from atu.errors import AtuError, ConfigError


def _friendly(fn):
    """Turn a user-fixable error into one line on stderr and a non-zero exit, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AtuError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read YAML config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(verbose: bool) -> None:
    """Align-then-Unlearn: make a language model forget chosen concepts, export it for vLLM, guard the endpoint."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@main.group()
def world() -> None:
    """The embedded world: fictional people, probes about them, and a small Llama that knows them."""


def _world_config(config: Path | None, tiny: bool, seed: int | None, people: int | None):
    from atu.world.config import WorldConfig

    if config is not None and tiny:
        raise ConfigError("--config and --tiny both choose a world config; pass one of them")
    cfg = WorldConfig.from_dict(_read_yaml(config)) if config else (WorldConfig.tiny() if tiny else WorldConfig())
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
@_friendly
def world_build(config, source, tiny, seed, people, force, run_eval) -> None:
    """Generate the world (or read yours), train its tokenizer and model, cache them, and print the cache path."""
    from atu.world.build import build_world

    cfg = _world_config(config, tiny, seed, people)
    t0 = time.time()
    built = build_world(cfg, source=source, force=force)
    click.echo(f"world: {built.root}  ({time.time() - t0:.1f}s; build took {built.build_info()['build_seconds']}s)")
    if run_eval:
        _print_probe_table(built)


def _print_probe_table(built) -> dict:
    from atu.loading import load_lm
    from atu.probes_eval import answer_probes, mean_recall_by_kind

    model, tokenizer = load_lm(built.model_dir)
    rows = answer_probes(model, tokenizer, built.probes(), progress=True)
    scores = mean_recall_by_kind(rows)
    click.echo(f"{'probe kind':<14}{'n':>6}{'ROUGE-L recall':>16}")
    for kind, value in scores.items():
        n = sum(r["kind"] == kind for r in rows)
        click.echo(f"{kind:<14}{n:>6}{'-' if value is None else f'{value:.3f}':>16}")
    return scores


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo_out"),
    show_default=True,
    help="Directory for the demo's outputs.",
)
@click.option("--tiny", is_flag=True, help="Use the tiny world (seconds instead of minutes).")
@_friendly
def demo(out: Path, tiny: bool) -> None:
    """The whole job on the embedded world: build it (cached after the first run) and score the model."""
    from atu.world.build import build_world
    from atu.world.config import WorldConfig

    out.mkdir(parents=True, exist_ok=True)
    cfg = WorldConfig.tiny() if tiny else WorldConfig()
    click.echo("building the embedded world (cached after the first run)...")
    t0 = time.time()
    built = build_world(cfg)
    info = built.build_info()
    click.echo(
        f"world: {built.root}\n  {info['parameters']:,} parameters, trained in {info['train_seconds']}s "
        f"(build {info['build_seconds']}s; this call {time.time() - t0:.1f}s)"
    )
    scores = _print_probe_table(built)
    (out / "world_eval.json").write_text(json.dumps({"world": str(built.root), "probes": scores}, indent=1) + "\n")
    click.echo(f"wrote {out / 'world_eval.json'}")


if __name__ == "__main__":
    main()
