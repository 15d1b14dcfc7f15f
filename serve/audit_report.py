"""`atu audit`: re-score logged traffic offline and report residual leakage per concept.

Records that carry raw text (a JSONL traffic file, or a log written with ``store_text``) are re-scored with the
export's scorer. Records that hold only hashes cannot be re-scored: their logged scores are used instead and
counted in separate columns, and the report says so. Per concept: records scored, flagged count and rate, mean
and max completion score, the worst excerpts (text only where the text is available, else span and hash), and a
histogram of completion scores with the threshold line (``histograms.png``), plus ``report.json``.
"""

from __future__ import annotations

import heapq
import json
import logging
import time
from pathlib import Path
from typing import Any

import click

from atu.cli_errors import friendly
from serve.audit import AuditError, AuditRecord, read_records

logger = logging.getLogger(__name__)

MAX_PLOTS = 24  # concepts drawn in histograms.png (the most flagged first); report.json has them all
RESCORE_BATCH = 16  # records re-scored per scorer call


class _ConceptStats:
    """Completion scores of one concept over the records, split by where they came from."""

    def __init__(self, threshold: float, top: int):
        self.threshold = threshold
        self.top = top
        self.scores = {"rescored": [], "logged": []}
        self.flagged = {"rescored": 0, "logged": 0}
        self.prompt_flagged = 0
        self.worst: list[tuple] = []  # min-heap of (score, seq, entry), the `top` highest kept
        self._seq = 0

    def add(self, source: str, score: float, flagged: bool, entry: dict) -> None:
        self.scores[source].append(score)
        self.flagged[source] += bool(flagged)
        self._seq += 1
        item = (score, -self._seq, entry)  # ties: the earlier record wins
        if len(self.worst) < self.top:
            heapq.heappush(self.worst, item)
        elif item > self.worst[0]:
            heapq.heapreplace(self.worst, item)

    def summary(self, n_rescored: int, n_logged: int) -> dict:
        all_scores = self.scores["rescored"] + self.scores["logged"]
        n = n_rescored + n_logged
        flagged = self.flagged["rescored"] + self.flagged["logged"]
        return {
            "threshold": self.threshold,
            "n": n,
            "n_rescored": n_rescored,
            "n_logged": n_logged,
            "n_logged_with_score": len(self.scores["logged"]),
            "flagged": flagged,
            "flagged_rescored": self.flagged["rescored"],
            "flagged_logged": self.flagged["logged"],
            "rate": flagged / n if n else None,
            "mean_score": sum(all_scores) / len(all_scores) if all_scores else None,
            "max_score": max(all_scores) if all_scores else None,
            "prompt_flagged": self.prompt_flagged,
            "worst": [entry for _, _, entry in sorted(self.worst, reverse=True)],
        }


def _entry(rec: AuditRecord, source: str, s: dict, excerpt: str | None) -> dict:
    return {
        "score": s["score"],
        "source": source,
        "request_id": rec.request_id,
        "record_id": rec.id,
        "position": s.get("position"),
        "span": list(s["span"]) if s.get("span") is not None else None,
        "excerpt": excerpt,
        "completion_sha256": rec.completion_sha256,
    }


def _rescore(scorer, records: list[AuditRecord], batch_size: int) -> list[dict]:
    """LeakageReport dicts of the records' (prompt, completion), scored in batches."""
    out: list[dict] = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        reports = scorer.score_batch([(r.prompt or "", r.completion) for r in chunk])
        out += [rep.to_dict() for rep in reports]
        logger.info("re-scored %d/%d records", len(out), len(records))
    return out


def _plot(stats: dict[str, _ConceptStats], order: list[str], path: Path) -> list[str]:
    """Histogram of completion scores per concept (re-scored and logged stacked), threshold as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = order[:MAX_PLOTS]
    cols = min(3, max(1, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.axis("off")
    for ax, label in zip(axes.flat, shown):
        st = stats[label]
        data = [st.scores["rescored"], st.scores["logged"]]
        values = data[0] + data[1] + [st.threshold]
        lo, hi = min(values), max(values)
        pad = max(0.02, 0.05 * (hi - lo))
        if st.scores["rescored"] or st.scores["logged"]:
            ax.hist(data, bins=30, range=(lo - pad, hi + pad), stacked=True, label=["re-scored", "logged"],
                    color=["tab:blue", "tab:orange"])  # fmt: skip
        ax.axvline(st.threshold, color="tab:red", linestyle="--", label=f"threshold {st.threshold:.3f}")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("completion score", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return shown


def audit_report(
    records_path: str | Path,
    export_dir: str | Path,
    out_dir: str | Path,
    backend: str = "hf",
    threshold_override: float | None = None,
    top: int = 5,
    device: str = "cpu",
    scorer: Any = None,
) -> dict:
    """Re-score the records at ``records_path`` against the export and write report.json and histograms.png.

    ``threshold_override`` replaces every concept's threshold (for re-scored and logged scores alike). ``scorer``
    (a serve.scoring.Scorer) is used instead of loading one from the export when given. Returns the report dict.
    """
    if top < 1:
        raise AuditError(f"top must be at least 1, got {top}.")
    t0 = time.perf_counter()
    records = list(read_records(records_path))
    if not records:
        raise AuditError(f"{records_path}: no records; nothing to report.")
    own = scorer is None
    if own:
        from serve.scoring import Scorer

        scorer = Scorer.from_export(export_dir, backend=backend, device=device, top_k=None)
    try:
        labels, stats, counts = _tally(scorer, records, top, threshold_override)
    finally:
        if own:
            scorer.close()
    concepts = {lab: stats[lab].summary(counts["rescored"], counts["logged"]) for lab in labels}
    order = sorted(labels, key=lambda c: (-concepts[c]["flagged"], -(concepts[c]["max_score"] or -2.0), c))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plotted = _plot(stats, order, out / "histograms.png")
    unscorable = len(records) - counts["rescored"] - counts["logged"]
    report = {
        "source": str(records_path),
        "export": str(export_dir),
        "backend": backend,
        "threshold_override": threshold_override,
        "records": {
            "total": len(records),
            "rescored": counts["rescored"],
            "logged_scores_only": counts["logged"],
            "unscorable": unscorable,
        },
        "notes": _notes(counts["logged"], unscorable),
        "order": order,
        "concepts": concepts,
        "histogram": str(out / "histograms.png"),
        "histogram_concepts": plotted,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    report["report"] = str(out / "report.json")
    return report


def _tally(scorer, records: list[AuditRecord], top: int, override: float | None):
    """(labels, per-concept stats, counts of records re-scored and read from logged scores)."""
    labels = list(scorer.labels)
    thresholds = [float(t) for t in scorer.thresholds]
    if override is not None:
        thresholds = [float(override)] * len(labels)
    stats = {lab: _ConceptStats(thr, top) for lab, thr in zip(labels, thresholds)}
    with_text = [r for r in records if r.has_text]
    counts = {"rescored": 0, "logged": 0}
    for rec, rep in zip(with_text, _rescore(scorer, with_text, RESCORE_BATCH)):
        counts["rescored"] += _add(stats, rec, "rescored", rep, override)
    for rec in records:
        if not rec.has_text and isinstance(rec.scores.get("completion"), list):
            counts["logged"] += _add(stats, rec, "logged", rec.scores, override)
    return labels, stats, counts


def _add(stats: dict[str, _ConceptStats], rec: AuditRecord, source: str, rep: dict, override: float | None) -> bool:
    """Count one record's LeakageReport dict (re-scored, or as logged) into the per-concept stats.

    Returns False, counting nothing, when the completion had no scored position (empty, or too short).
    """

    def flagged(s: dict) -> bool:  # the scorer's rule: flagged strictly above the threshold
        return s["score"] > override if override is not None else bool(s.get("flagged"))

    scored = [s for s in rep.get("completion") or [] if s.get("concept") in stats and _valid(s)]
    if not scored and not rep.get("flagged"):
        return False
    for s in scored:
        stats[s["concept"]].add(source, float(s["score"]), flagged(s), _entry(rec, source, s, s.get("excerpt")))
    if override is None:  # a logged scores list may hold only the top_k concepts; its flagged list is complete
        for c in set(rep.get("flagged") or []) - {s["concept"] for s in scored}:
            if c in stats:
                stats[c].flagged[source] += 1
    for s in rep.get("prompt") or []:
        if s.get("concept") in stats and _valid(s) and flagged(s):
            stats[s["concept"]].prompt_flagged += 1
    return True


def _valid(s: dict) -> bool:
    """A concept score that was computed (position -1 means the part had no window to score)."""
    return isinstance(s.get("score"), (int, float)) and s.get("position", 0) >= 0


def _notes(n_logged: int, unscorable: int) -> list[str]:
    notes = []
    if n_logged:
        notes.append(
            f"{n_logged} records hold no raw text (hash only) and could not be re-scored: their logged scores are "
            "used and counted separately (columns 'logged'); their mean/max cover only the concepts the guard "
            "logged a score for, and their excerpts are given as span + completion hash."
        )
    if unscorable:
        notes.append(
            f"{unscorable} records have no completion to score (errors, or empty or one-token completions): skipped."
        )
    return notes


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_report(report: dict) -> str:
    """The report as a plain-text table (most flagged concepts first), its notes, and the worst excerpts."""
    r = report["records"]
    lines = [
        f"{r['total']} records: {r['rescored']} re-scored, {r['logged_scores_only']} logged scores only, "
        f"{r['unscorable']} unscorable",
        f"{'concept':<28}{'thr':>7}{'n':>7}{'rescored':>9}{'logged':>8}{'flagged':>8}{'rate':>8}{'mean':>8}"
        f"{'max':>8}{'prompt':>8}",
    ]
    for c in report["order"]:
        s = report["concepts"][c]
        lines.append(
            f"{c[:27]:<28}{s['threshold']:>7.3f}{s['n']:>7}{s['n_rescored']:>9}{s['n_logged']:>8}{s['flagged']:>8}"
            f"{_fmt(s['rate']):>8}{_fmt(s['mean_score']):>8}{_fmt(s['max_score']):>8}{s['prompt_flagged']:>8}"
        )
    lines += [f"note: {n}" for n in report["notes"]]
    for c in report["order"]:
        s = report["concepts"][c]
        if not s["flagged"]:
            continue
        lines.append(f"worst for {c}:")
        for w in s["worst"]:
            where = repr(w["excerpt"]) if w["excerpt"] is not None else (
                f"span {w['span']} of completion sha256 {(w['completion_sha256'] or '?')[:16]}")  # fmt: skip
            lines.append(f"  {w['score']:.3f} [{w['source']}] {w['request_id'] or w['record_id']}: {where}")
    return "\n".join(lines)


@click.command("audit")
@click.argument("records", metavar="LOGFILE_OR_JSONL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--export", "export_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The export whose guard re-scores the traffic.")  # fmt: skip
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory [default: LOGFILE_audit next to the input].")  # fmt: skip
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Device for the hf backend.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Worst excerpts per concept.")
@click.option("--threshold", type=float, default=None, help="Use this threshold for every concept.")
def audit_command(records, export_dir, out_dir, backend, device, top, threshold) -> None:
    """Re-score an audit log or a JSONL traffic file offline and print the residual leakage per concept."""
    friendly(_audit_cli)(records, export_dir, out_dir, backend, device, top, threshold)


def _audit_cli(records, export_dir, out_dir, backend, device, top, threshold) -> None:
    out_dir = out_dir or records.with_name(records.stem + "_audit")
    report = audit_report(records, export_dir, out_dir, backend=backend, threshold_override=threshold, top=top,
                          device=device)  # fmt: skip
    click.echo(format_report(report))
    click.echo(f"wrote {report['report']} and {report['histogram']}")
