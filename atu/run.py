"""The jobs behind `atu run`, `atu align`, `atu unlearn` and `atu export`, each composed of the steps of
atu/steps.py; the config they run is a `RunConfig` (atu/run_config.py).

`run` is the whole job: prepare, align, evaluate before, unlearn, evaluate after, build the guard, export. The others
are its parts, for a job split in stages: `align` keeps the aligned predictor in ``aligned/``, `unlearn` keeps the
unlearned model in ``unlearned/``, `export_unlearned` exports what `unlearn` kept.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from atu import envs, steps
from atu.aligned import initial_alignment
from atu.distributed import SINGLE, Dist, from_environment
from atu.errors import ConfigError
from atu.run_config import RunConfig
from atu.run_data import EVAL_RETAIN_TEXTS, RunData, load_run_data, resolve_world, split_corpus
from atu.schedule import ScheduleOptions, ScheduleResult
from atu.unlearned import UNLEARNED_DIR, load_unlearned, save_unlearned

logger = logging.getLogger(__name__)

# Re-exported: callers of atu.run read the run's data through these names.
__all__ = [
    "EVAL_RETAIN_TEXTS",
    "UNLEARNED_DIR",
    "RunData",
    "RunResult",
    "align",
    "export_unlearned",
    "load_run_data",
    "resolve_world",
    "run",
    "split_corpus",
    "unlearn",
]


@dataclass
class Evaluation:
    """The figures before and after unlearning (`atu run` only)."""

    before: dict | None  # probe figures of the original model; None without probes
    after: dict | None  # probe figures of the unlearned model; None without probes
    similarity: dict  # mean cosines per concept: "before", "after_final_predictor", "after_driving_predictor"


@dataclass
class RunResult:
    """What a job returns. `to_dict` is the summary: what eval.json holds and the CLI and benchmarks read."""

    forget: list[str]  # the forgotten concepts
    hook_layer: int
    stop_reason: str
    processes: int  # data-parallel processes that shared the alignment and unlearning steps
    stages: list[dict]  # per kept stage: stage, tau, steps, rise, val_ppl, heldout_forget_ppl_ratio, refines, seconds
    align: dict  # the initial alignment's metrics
    final_thresholds: list[float]
    forgetting: dict  # whether held-out texts about the concepts were forgotten
    unlearned: str | None = None  # `atu unlearn`: where the unlearned model was kept
    evaluation: Evaluation | None = None
    seconds: float | None = None  # the job's time up to the guard and export
    guard_target: str | None = None
    guard_thresholds: list[float] | None = None
    export: str | None = None  # the export's directory
    harden: dict | None = None  # harden.enabled: the hardening's record (atu/harden.py)

    @classmethod
    def of(cls, data: RunData, result: ScheduleResult, processes: int) -> RunResult:
        keys = ("stage", "tau", "steps", "rise", "val_ppl", "heldout_forget_ppl_ratio", "refines", "stage_seconds")
        stages = [{k: s.get(k) for k in keys} for s in result.stages]
        return cls(
            data.forget, result.hook_layer, result.stop_reason, processes, stages, result.align_metrics,
            result.final_thresholds, result.forgetting,
        )  # fmt: skip

    def to_dict(self) -> dict:
        out = {
            "forget": self.forget,
            "hook_layer": self.hook_layer,
            "stop_reason": self.stop_reason,
            "processes": self.processes,
            "stages": self.stages,
            "align": self.align,
            "final_thresholds": self.final_thresholds,
            "forgetting": self.forgetting,
        }
        if self.unlearned is not None:
            out["unlearned"] = self.unlearned
        if self.evaluation is not None:
            ev = self.evaluation
            out.update(similarity=ev.similarity, before=ev.before, after=ev.after)
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.guard_target is not None:
            out.update(guard_target=self.guard_target, guard_thresholds=self.guard_thresholds)
        if self.export is not None:
            out["export"] = self.export
        if self.harden is not None:
            out["harden"] = self.harden
        return out


@contextmanager
def _processes(cfg: RunConfig) -> Iterator[Dist]:
    """The data-parallel processes of this launch (one, without torchrun or ``accelerate launch``)."""
    dist = from_environment(cfg.device)
    try:
        yield dist
    except BaseException:
        dist.close(finished=False)
        raise
    dist.close()


def run(
    cfg: RunConfig,
    *,
    progress: bool = True,
    export: bool = True,
    replace_stale: bool = False,
    on_stage: Callable[..., None] | None = None,
) -> dict | None:
    """The whole job. Writes ``cfg.out``: metrics.jsonl, aligned/, checkpoint/, export/ (unless not ``export``),
    eval.json. Returns the summary (`RunResult.to_dict`).

    ``on_stage(record, model=, predictor=, concept_vectors=, hook_layer=)`` is called after every kept stage (after
    its re-alignment), with the model in eval mode: the model at that point is the result of the schedule cut after
    that stage. It must not change the model or the predictor.

    A checkpoint in ``cfg.out`` from another config is an error, unless ``replace_stale`` (the demo's own directory,
    after an upgrade changed its settings): then the run starts over and the next checkpoint replaces it.

    Launched by torchrun or ``accelerate launch``, the processes share the unlearning steps (atu/distributed.py); the
    first one evaluates, exports and returns the summary, the others return None."""
    with _processes(cfg) as dist:
        t0, progress = time.time(), progress and dist.main
        job = steps.prepare(cfg, dist, progress=progress)
        options = ScheduleOptions(
            run_dir=Path(cfg.out), progress=progress, replace_stale=replace_stale, on_stage=on_stage, dist=dist
        )
        start = steps.start(cfg, job, options)
        before = steps.evaluate_before(cfg, job, start) if dist.main else None
        result, final = steps.unlearn(cfg, job, start, options)
        if not dist.main:
            return None
        summary = RunResult.of(job.data, result, dist.world)
        result, final, unhardened = _hardened(cfg, job, start, result, final, summary, progress)
        after, similarity = steps.evaluate_after(cfg, job, result, final, unhardened)
        summary.evaluation = Evaluation(before.probes, after, {"before": before.similarity, **similarity})
        summary.seconds = round(time.time() - t0, 1)
        return _guard_and_export(cfg, job, result, final, summary, export)


def _hardened(cfg: RunConfig, job, start, result: ScheduleResult, final, summary: RunResult, progress: bool):
    """(result, model, the model before hardening or None): `steps.harden` applied when ``harden.enabled`` (on
    the first process only: the others have returned), its record kept in ``summary``."""
    hardened = steps.harden(cfg, job, start, result, final, progress=progress)
    if hardened is None:
        return result, final, None
    summary.harden = hardened.record
    return hardened.result, hardened.model, hardened.unlearned


def _guard_and_export(cfg: RunConfig, job, result: ScheduleResult, final, summary: RunResult, export: bool) -> dict:
    """Build the guard, write the export (if ``export``) and eval.json; returns the summary."""
    out = Path(cfg.out)
    guard = steps.build_guard(
        cfg, job, final, result.predictor, result.hook_layer, result.concept_vectors, result.final_thresholds
    )
    summary.guard_target = guard[0].concept_target
    summary.guard_thresholds = [round(float(t), 4) for t in guard[1].thresholds]
    if export:
        ev = summary.evaluation
        brief = {"before": _brief(ev.before), "after": _brief(ev.after), "stop_reason": result.stop_reason}
        summary.export = str(steps.export(cfg, job, final, result.predictor, guard, brief, out / "export"))
    (out / "eval.json").write_text(json.dumps(summary.to_dict(), indent=1, sort_keys=True) + "\n")
    return summary.to_dict()


def align(cfg: RunConfig, *, progress: bool = True) -> dict | None:
    """`atu align`: align the predictor to the model (LM frozen) and keep it in ``cfg.out/aligned``, where
    `atu unlearn` and `atu run` of a config with the same model, texts and ``align`` section reuse it.
    Returns the alignment metrics (None on processes other than the first)."""
    with _processes(cfg) as dist:
        progress = progress and dist.main
        j = steps.prepare(cfg, dist, progress=progress)
        aligned = initial_alignment(
            j.model, j.tokenizer, j.encoder, j.inputs.align_texts, cfg.align, run_dir=Path(cfg.out),
            progress=progress, dist=dist,
        )  # fmt: skip
        return aligned.metrics if dist.main else None


def unlearn(cfg: RunConfig, *, progress: bool = True) -> dict | None:
    """`atu unlearn`: align (or reuse ``cfg.out/aligned``) and run the unlearning schedule, without evaluating; keep
    the unlearned model and its predictors in ``cfg.out/unlearned`` for `atu export`. Returns the summary."""
    out = Path(cfg.out)
    with _processes(cfg) as dist:
        t0, progress = time.time(), progress and dist.main
        job = steps.prepare(cfg, dist, progress=progress)
        options = ScheduleOptions(run_dir=out, progress=progress, dist=dist)
        start = steps.start(cfg, job, options)
        result, final = steps.unlearn(cfg, job, start, options)
        if not dist.main:
            return None
        summary = RunResult.of(job.data, result, dist.world)
        result, final, _ = _hardened(cfg, job, start, result, final, summary, progress)
        save_unlearned(out / UNLEARNED_DIR, final, job.tokenizer, result, summary.to_dict(), cfg.to_dict())
        summary.unlearned = str(out / UNLEARNED_DIR)
        summary.seconds = round(time.time() - t0, 1)
        return summary.to_dict()


def export_unlearned(cfg: RunConfig, out_dir: Path | None = None, *, overwrite: bool = False, progress: bool = True):
    """`atu export`: write the export of what `atu unlearn` left in ``cfg.out/unlearned`` (to ``cfg.out/export``
    unless ``out_dir``), with the guard that ``cfg`` asks for. Returns the export's path."""
    if envs.world_size() > 1:
        raise ConfigError("atu export runs in one process; start it without torchrun or accelerate launch")
    kept = load_unlearned(Path(cfg.out), cfg.to_dict())
    j = steps.prepare(cfg, SINGLE, progress=progress, model_path=kept.model_dir)
    predictor = kept.predictor.to(j.device)
    summary = kept.summary
    guard = steps.build_guard(
        cfg, j, j.model, predictor, summary["hook_layer"], kept.concept_vectors, summary["final_thresholds"]
    )
    dest = Path(out_dir) if out_dir is not None else Path(cfg.out) / "export"
    brief = {"stop_reason": summary["stop_reason"]}
    return steps.export(cfg, j, j.model, predictor, guard, brief, dest, overwrite=overwrite or out_dir is None)


def _brief(ev: dict | None) -> dict | None:
    if ev is None:
        return None
    return {k: v for k, v in ev.items() if k != "answers"}
