"""What a client learns about the scoring of its own request: the operator's choice, private by default.

The guard builds one full annotation per exchange (``policy.leakage_object``: concept names, scores, thresholds,
positions, excerpts). That full view goes to the audit log and to the operator-only endpoints. What reaches a client,
in the body, the headers and the stream events, is cut down here to the level the operator set:

- ``action`` (default): the policy, the action (passed, annotated, blocked, cut, error) and whether anything was
  flagged, per response and per choice. No concept name, score, threshold or excerpt.
- ``scores``: also each choice's highest completion score. A client can then tell how close an answer came to a
  threshold: an oracle for staying just under it, so only for trusted clients.
- ``full``: the whole annotation (names, scores, thresholds, positions, excerpts). It names the forgotten concepts
  to anyone who asks anything; meant for testing and for an operator's own clients.

Whatever the level, text the policy held back never leaves: the excerpts and spans of a blocked choice, and of every
choice of a cut stream, are removed (an excerpt is about 80 characters of the very text the refusal replaced).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from urllib.parse import quote

from serve import policy as pol

LEVELS = ("action", "scores", "full")
_WITHHELD = (pol.BLOCKED, pol.CUT)


def concept_ids(labels: Sequence[str]) -> dict[str, str]:
    """Stable, name-free metric labels: ``c<row>`` for the concept at that row of the export's index."""
    return {label: f"c{i}" for i, label in enumerate(labels)}


def concept_id(label: str, ids: dict[str, str]) -> str:
    """The label's id; a label outside the index (a wrapped scorer's) gets a hash, never its name."""
    return ids.get(label) or "h" + hashlib.sha256(label.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _strip_withheld(report: dict) -> dict:
    """A report of a choice whose text was withheld: its completion scores keep no excerpt and no span."""
    out = dict(report)
    out["completion"] = [
        {k: v for k, v in s.items() if k not in ("excerpt", "span", "position")} for s in report.get("completion", [])
    ]
    return out


def _withheld(leak: dict, i: int, blocked: Sequence[bool] | None) -> bool:
    if leak["action"] == pol.CUT:  # what was held back when the stream was cut never reached the client
        return True
    return leak["action"] == pol.BLOCKED and (blocked is None or (i < len(blocked) and blocked[i]))


def client_leakage(leak: dict, level: str, blocked: Sequence[bool] | None = None) -> dict:
    """The annotation a client may see at ``level``. ``blocked[i]``: choice ``i`` was replaced by the refusal
    (None: every choice of a blocked response was)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}.")
    reports = leak.get("choices", [])
    out = {"policy": leak["policy"], "action": leak["action"], "flagged": bool(leak["flagged"])}
    if leak.get("error") is not None:
        out["error"] = "scoring failed"  # the reason may quote the text; it is in the audit log and the server log
    if level == "action":
        out["choices"] = [{"flagged": bool(r.get("flagged"))} for r in reports]
        return out
    if level == "scores":
        out["max_score"] = leak.get("max_score")
        out["choices"] = [{"flagged": bool(r.get("flagged")), "max_score": r.get("max_score")} for r in reports]
        return out
    full = copy.deepcopy(leak)
    full["choices"] = [_strip_withheld(r) if _withheld(leak, i, blocked) else r for i, r in enumerate(full["choices"])]
    if "error" in out:
        full["error"] = out["error"]
    return full


def client_headers(leak: dict, level: str, request_id: str) -> dict[str, str]:
    """Response headers summarising the annotation at ``level`` (concept names only at ``full``)."""
    headers = {
        "X-Request-Id": request_id,
        "X-ATU-Action": leak["action"],
        "X-ATU-Flagged": str(int(bool(leak["flagged"]))),
    }
    if leak.get("error"):
        headers["X-ATU-Leakage-Error"] = "1"
    if level in ("scores", "full") and leak.get("max_score") is not None:
        headers["X-ATU-Leakage-Max"] = f"{leak['max_score']:.4f}"
    if level == "full":  # percent-encoded: headers are ASCII
        headers["X-ATU-Leakage-Flagged"] = ",".join(quote(c, safe=" ") for c in leak["flagged"])
    return headers
