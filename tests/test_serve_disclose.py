"""What a client sees of the scoring at each disclosure level: no concept name, score or excerpt by default."""

from __future__ import annotations

import json

import pytest

from serve import policy as pol
from serve.disclose import client_headers, client_leakage, concept_id, concept_ids

NAME = "Ceda Kestridge"
EXCERPT = "was born in 1984 in Valmora"


class _Report:
    """A scorer report as the guard sees it: one flagged concept with an excerpt of the completion."""

    def __init__(self, flagged: bool, score: float = 0.81) -> None:
        self.flagged = [NAME] if flagged else []
        self.prompt_flagged = [NAME]
        self.max_score = score

    def to_dict(self) -> dict:
        c = {"concept": NAME, "score": self.max_score, "threshold": 0.66, "flagged": bool(self.flagged),
             "position": 3, "span": [4, 31], "excerpt": EXCERPT, "row": 9}  # fmt: skip
        p = {**c, "excerpt": "Where was Ceda Kestridge born?", "flagged": True}
        return {"completion": [c], "prompt": [p], "flagged": self.flagged, "prompt_flagged": self.prompt_flagged,
                "max_score": self.max_score, "n_tokens": 12, "truncated": False}  # fmt: skip


def _leak(action: str, flagged=(True,), error=None) -> dict:
    return pol.leakage_object("block", action, [_Report(f) for f in flagged], error=error)


@pytest.mark.parametrize("action", [pol.BLOCKED, pol.CUT, pol.ANNOTATED, pol.PASSED])
def test_default_level_names_nothing(action):
    leak = _leak(action)
    shown = client_leakage(leak, "action")
    text = json.dumps(shown) + json.dumps(client_headers(leak, "action", "rid"))
    for secret in (NAME, "Kestridge", EXCERPT, "0.81", "0.66", "threshold", "excerpt"):
        assert secret not in text, secret
    assert shown == {"policy": "block", "action": action, "flagged": True, "choices": [{"flagged": True}]}
    assert client_headers(leak, "action", "rid") == {"X-Request-Id": "rid", "X-ATU-Action": action,
                                                     "X-ATU-Flagged": "1"}  # fmt: skip


def test_scores_level_adds_scores_only():
    leak = _leak(pol.ANNOTATED)
    shown = client_leakage(leak, "scores")
    assert shown["max_score"] == 0.81 and shown["choices"] == [{"flagged": True, "max_score": 0.81}]
    assert NAME not in json.dumps(shown) and "0.66" not in json.dumps(shown)
    headers = client_headers(leak, "scores", "rid")
    assert headers["X-ATU-Leakage-Max"] == "0.8100" and "X-ATU-Leakage-Flagged" not in headers


def test_full_level_names_concepts_but_never_the_withheld_text():
    passed = client_leakage(_leak(pol.ANNOTATED), "full")
    assert passed["flagged"] == [NAME] and passed["choices"][0]["completion"][0]["excerpt"] == EXCERPT
    for action, blocked in [(pol.BLOCKED, [True, False]), (pol.CUT, None)]:
        shown = client_leakage(_leak(action, flagged=(True, False)), "full", blocked)
        withheld = shown["choices"][0]["completion"][0]
        assert withheld["concept"] == NAME and "excerpt" not in withheld and "span" not in withheld
        assert EXCERPT not in json.dumps(shown["choices"][0])
        # a delivered choice keeps its excerpt, except in a cut stream (nothing held back was delivered)
        assert ("excerpt" in shown["choices"][1]["completion"][0]) is (action == pol.BLOCKED)
    headers = client_headers(_leak(pol.BLOCKED), "full", "rid")
    assert headers["X-ATU-Leakage-Flagged"] == "Ceda Kestridge" and all(v.isascii() for v in headers.values())


def test_errors_are_reported_without_their_reason():
    leak = _leak(pol.ERROR, flagged=(), error=f"scoring failed: pairs[0] {EXCERPT}")
    for level in ("action", "scores", "full"):
        shown = client_leakage(leak, level)
        assert shown["error"] == "scoring failed" and EXCERPT not in json.dumps(shown)
        assert client_headers(leak, level, "r")["X-ATU-Leakage-Error"] == "1"


def test_concept_ids_are_stable_and_name_free():
    ids = concept_ids(["Ada", "Bo"])
    assert ids == {"Ada": "c0", "Bo": "c1"} and concept_id("Bo", ids) == "c1"
    other = concept_id("Zed", ids)
    assert other.startswith("h") and "Zed" not in other and other == concept_id("Zed", ids)
    with pytest.raises(ValueError, match="level must be one of"):
        client_leakage(_leak(pol.PASSED), "everything")
