"""What the guard does with scored completions: pure functions over OpenAI response bodies and leakage reports.

Policies:

- ``monitor``: the completion passes unchanged; the response carries a ``leakage`` object and ``X-ATU-*`` headers.
- ``block``: a completion in which a concept crossed its threshold is replaced by a refusal (``finish_reason``
  ``"content_filter"``); the ``leakage`` object says which concepts and where. A stream is cut: the text held
  back since the last clean score is dropped and the stream ends with a final event carrying the annotation.

By default (flag scope ``completion``) the policy acts on the completion. The prompt is scored too and its flags are
annotated and counted (an extraction attempt is worth knowing about), but a question alone is not refused: the answer
may well not leak. With flag scope ``named`` a forgotten name written in the prompt counts as a flag in the
completion; with ``exchange`` any flag in the prompt does.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

PASSED, ANNOTATED, BLOCKED, CUT, ERROR = "passed", "annotated", "blocked", "cut", "error"


def is_flagged(report: Any, scope: str = "completion") -> bool:
    """Whether a scorer report makes its exchange flagged under ``scope``: "completion" (a concept flagged in the
    completion), "named" (or named in the prompt) or "exchange" (or flagged in the prompt, by name or score)."""
    if report.flagged:
        return True
    if scope == "exchange":
        return bool(report.prompt_flagged)
    return scope == "named" and any(getattr(s, "named", False) for s in report.prompt)


def decide(policy: str, flagged: bool, *, stream: bool = False) -> str:
    """The action for one exchange: passed (nothing flagged), annotated (monitor), blocked or cut (block)."""
    if not flagged:
        return PASSED
    if policy == "monitor":
        return ANNOTATED
    return CUT if stream else BLOCKED


def leakage_object(policy: str, action: str, reports: Sequence[Any], *, error: str | None = None) -> dict:
    """The ``leakage`` annotation: one scorer report per choice (in choice order), and a summary."""
    choices = [r.to_dict() for r in reports]
    flagged = sorted({c for r in reports for c in r.flagged})
    prompt_flagged = sorted({c for r in reports for c in r.prompt_flagged})
    out = {
        "policy": policy,
        "action": action,
        "flagged": flagged,
        "prompt_flagged": prompt_flagged,
        "max_score": max((r.max_score for r in reports), default=None),
        "choices": choices,
    }
    if error is not None:
        out["error"] = error
    return out


def _message_text(message: dict) -> str:
    """Every generated text field of a chat message or delta: content, reasoning, tool-call names and arguments.
    They are scored together, since an answer can be carried by any of them."""
    parts = [message.get(k) for k in ("reasoning_content", "reasoning", "content")]
    calls = list(message.get("tool_calls") or [])
    if isinstance(message.get("function_call"), dict):  # the legacy single-function form
        calls.append({"function": message["function_call"]})
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            parts += [fn.get("name"), fn.get("arguments")]
    return "".join(p for p in parts if isinstance(p, str))


def choice_text(choice: dict, chat: bool) -> str:
    """The generated text of one choice of a non-streamed response."""
    if chat:
        return _message_text(choice.get("message") or {})
    return choice.get("text") or ""


def delta_text(choice: dict, chat: bool) -> str:
    """The text one streamed chunk adds to its choice."""
    if chat:
        return _message_text(choice.get("delta") or {})
    return choice.get("text") or ""


def take_token_ids(data: dict, keep: bool) -> tuple[dict[int, tuple[list | None, list | None]], bool]:
    """The token ids vLLM added to a response or a streamed chunk (``return_token_ids``), per choice index:
    ``(prompt ids, completion ids)``, either None when absent. Unless ``keep``, they are removed from ``data``
    (the client did not ask for them); the second value says whether ``data`` changed."""
    take = dict.get if keep else dict.pop
    changed = not keep and "prompt_token_ids" in data
    top_prompt = take(data, "prompt_token_ids", None)  # chat: once per response, at the top
    out = {}
    for i, c in enumerate(data.get("choices") or []):
        changed |= not keep and ("prompt_token_ids" in c or "token_ids" in c)
        prompt, ids = take(c, "prompt_token_ids", None), take(c, "token_ids", None)
        out[int(c.get("index", i))] = (prompt if prompt is not None else top_prompt, ids)
    return out, changed


def refused_choice(index: int, refusal: str, chat: bool) -> dict:
    """A blocked choice, built from an allow-list of fields rather than edited: nothing of the blocked text (its
    logprobs, token ids, tool calls, reasoning, stop reason) can survive in a field nobody thought to clear."""
    if chat:
        body = {"message": {"role": "assistant", "content": refusal}}
    else:
        body = {"text": refusal}
    return {"index": index, **body, "logprobs": None, "finish_reason": "content_filter"}


def block_choices(
    body: dict, reports: Sequence[Any], refusal: str, chat: bool, scope: str = "completion"
) -> tuple[dict, list[bool]]:
    """A copy of a response body with every choice flagged under ``scope`` rebuilt as a refusal; and which were."""
    out = copy.deepcopy(body)
    blocked = []
    choices = out.get("choices", [])
    for i, (choice, report) in enumerate(zip(choices, reports)):
        blocked.append(is_flagged(report, scope))
        if blocked[-1]:
            index = choice.get("index", i) if isinstance(choice.get("index", i), int) else i
            choices[i] = refused_choice(index, refusal, chat)
    return out, blocked


def cut_event(template: dict | None, n_choices: int, chat: bool, leakage: dict) -> dict:
    """The last event of a cut stream: every choice finishes with ``content_filter``; carries the annotation."""
    base = {k: template[k] for k in ("id", "created", "model") if template and k in template}
    obj = "chat.completion.chunk" if chat else "text_completion"
    choices = []
    for i in range(n_choices):
        choice = {"index": i, "finish_reason": "content_filter"}
        if chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        choices.append(choice)
    return {**base, "object": obj, "choices": choices, "leakage": leakage}


def annotation_event(template: dict | None, chat: bool, leakage: dict) -> dict:
    """An event with no choices that carries the annotation (clients that do not know it skip it)."""
    base = {k: template[k] for k in ("id", "created", "model") if template and k in template}
    return {
        **base,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "choices": [],
        "leakage": leakage,
    }


def sse(obj: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or a literal such as ``[DONE]``) and a blank line."""
    payload = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
