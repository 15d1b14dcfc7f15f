"""One audit record: a scored exchange as the audit log stores it (``serve.audit``) and ``atu audit`` reads it.

Raw prompt and completion text is kept in a record, but the log stores it only when the operator asks for it;
otherwise it keeps the texts' SHA-256 hashes, the character spans of the flagged excerpts and the scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import datetime, timezone
from typing import Any

from atu.errors import FormatError


def sha256_text(text: str | None) -> str | None:
    """Hex SHA-256 of the UTF-8 text, or None for None."""
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def iso_time(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=timezone.utc).isoformat(timespec="microseconds")


def _flagged_spans(scores: dict) -> list[dict]:
    """Spans of the flagged concepts' excerpts, from a LeakageReport dict (parts "prompt" and "completion")."""
    spans = []
    for part in ("prompt", "completion"):
        for s in scores.get(part) or []:
            if isinstance(s, dict) and s.get("flagged") and s.get("span") is not None:
                start, end = s["span"]
                spans.append({"concept": s.get("concept"), "part": part, "start": int(start), "end": int(end)})
    return spans


@dataclasses.dataclass
class AuditRecord:
    """One scored exchange. ``prompt``/``completion`` are the raw texts; the log stores them only if asked to.

    ``scores`` is ``LeakageReport.to_dict()``; ``spans`` are the flagged excerpts' ``[start, end)`` character
    offsets in their part's text. ``time`` is a unix timestamp (filled in at append when None); ``id`` is set
    by the log.
    """

    request_id: str
    endpoint: str = ""
    model: str = ""
    policy: str = ""
    action: str = "passed"
    stream: bool = False
    flagged: list[str] = dataclasses.field(default_factory=list)
    scores: dict = dataclasses.field(default_factory=dict)
    max_score: float | None = None
    prompt_sha256: str | None = None
    completion_sha256: str | None = None
    spans: list[dict] = dataclasses.field(default_factory=list)
    upstream_ms: float | None = None
    scoring_ms: float | None = None
    prompt: str | None = None
    completion: str | None = None
    time: float | None = None
    id: int | None = None
    client_request_id: str | None = None

    @classmethod
    def from_exchange(cls, report: Any = None, **fields: Any) -> AuditRecord:
        """A record of an exchange: ``fields`` (this class's, texts included) and its scorer's report (a
        ``LeakageReport``, its dict, or None when scoring failed), from which the scores, flags, spans and the
        texts' hashes are filled in."""
        scores = report.to_dict() if hasattr(report, "to_dict") else dict(report or {})
        rec = cls(**fields, flagged=list(scores.get("flagged") or []), scores=scores,
                  max_score=scores.get("max_score"), spans=_flagged_spans(scores))  # fmt: skip
        rec.prompt_sha256 = sha256_text(rec.prompt)
        rec.completion_sha256 = sha256_text(rec.completion)
        return rec

    @property
    def has_text(self) -> bool:
        """Whether the completion text is available (so the record can be re-scored)."""
        return self.completion is not None

    def to_dict(self) -> dict:
        """JSON-safe dict; also the line shape of a JSONL audit file."""
        out = dataclasses.asdict(self)
        out["time_iso"] = None if self.time is None else iso_time(self.time)
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "record") -> AuditRecord:
        """A record from a JSONL line: the full record shape or a traffic line {prompt, completion, ...}."""
        if not isinstance(data, dict):
            raise FormatError(f"{where}: expected a JSON object, got {type(data).__name__}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in fields}
        kw.setdefault("request_id", "" if data.get("id") is None else str(data["id"]))
        for key in ("prompt", "completion"):
            if kw.get(key) is not None and not isinstance(kw[key], str):
                raise FormatError(f"{where}: {key!r} must be a string, got {type(kw[key]).__name__}.")
        if kw.get("completion") is None and not kw.get("completion_sha256") and not kw.get("scores"):
            raise FormatError(f"{where}: no 'completion' text, hash or scores; a traffic line needs 'completion'.")
        t = kw.get("time")
        if isinstance(t, str):
            try:
                kw["time"] = datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
            except ValueError:
                raise FormatError(f"{where}: 'time' {t!r} is neither a unix number nor an ISO date.") from None
        elif t is not None and not isinstance(t, (int, float)):
            raise FormatError(f"{where}: 'time' must be a unix number or an ISO string, got {t!r}.")
        rec = cls(**kw)
        rec.prompt_sha256 = rec.prompt_sha256 or sha256_text(rec.prompt)
        rec.completion_sha256 = rec.completion_sha256 or sha256_text(rec.completion)
        return rec
