"""Validation of OpenAI-style request bodies before they reach vLLM, and the prompt text the model will see.

A bad body is answered here with 400 and a reason, so the guard never forwards something it cannot score.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from serve.params import CHAT_PARAMS, COMPLETION_PARAMS, BadRequest, Limits, check_params, token_ids

__all__ = [
    "BadRequest", "Limits", "ParsedRequest", "parse_chat", "parse_completion", "parse_json", "parse_leakage",
    "parse_tokens_call",
]  # fmt: skip


@dataclass
class ParsedRequest:
    body: dict  # the JSON body, forwarded unchanged
    model: str
    prompts: list[str]  # the text the model is given, one per prompt (chat: the rendered template)
    n: int  # choices per prompt
    stream: bool
    chat: bool


MAX_DEPTH = 32  # JSON nesting a request may use (tool schemas nest; nothing needs more)
_ROLES = ("system", "user", "assistant", "tool", "developer")
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_call_id"})


def _reject_constant(name: str):
    raise BadRequest(f"the body is not valid JSON ({name} is not a JSON number)")


def _walk(value: Any, depth: int = 0) -> None:
    """Refuse what the tokenizer and vLLM cannot take: deep nesting, lone surrogates, non-finite numbers."""
    if depth > MAX_DEPTH:
        raise BadRequest(f"the body nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        if not _encodes(value):
            raise BadRequest("the body holds a lone surrogate (\\ud800-\\udfff): not valid Unicode text")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest("the body holds a number too large for a float")
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk(k, depth + 1)
            _walk(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _walk(v, depth + 1)


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise BadRequest(f"the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # integers past Python's digit limit
        raise BadRequest(f"the body is not usable JSON ({str(e)[:100]})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    _walk(body)
    return body


def _model(body: dict) -> str:
    model = body.get("model")
    if model is None:
        raise BadRequest("'model' is required (a model name, see /v1/models)")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise BadRequest(f"'model' must be a model name (see /v1/models), got {type(model).__name__}")
    return model


def _decode(tokenizer, ids: list[int], limits: Limits) -> str:
    token_ids("prompt", ids, limits)
    return tokenizer.decode(ids)


def _prompts(prompt: Any, tokenizer, limits: Limits) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest("'prompt' is required: a non-empty string, list of strings or token ids")
    if _token_list(prompt, "'prompt'"):
        return [_decode(tokenizer, prompt, limits)]
    if len(prompt) > limits.max_prompts:
        raise BadRequest(f"'prompt' holds {len(prompt)} prompts; at most {limits.max_prompts} per request")
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) and p and _token_list(p, "'prompt'") for p in prompt):
        return [_decode(tokenizer, p, limits) for p in prompt]
    raise BadRequest("'prompt' must be a string, a list of strings or a list of token-id lists")


def _token_list(value: list, what: str) -> bool:
    """True when ``value`` is a list of token ids; a list mixing ids and other things is an error."""
    ints = [isinstance(v, int) and not isinstance(v, bool) for v in value]
    if all(ints):
        return True
    if any(ints):
        raise BadRequest(f"{what} mixes token ids with other values")
    return False


def parse_completion(body: dict, tokenizer, limits: Limits | None = None) -> ParsedRequest:
    """``/v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids or a list of such lists."""
    limits = limits or Limits(vocab_size=_vocab_size(tokenizer))
    model = _model(body)
    check_params(body, COMPLETION_PARAMS, {"model", "prompt"}, limits, chat=False)
    prompts = _prompts(body.get("prompt"), tokenizer, limits)
    n, stream = body.get("n") or 1, bool(body.get("stream"))
    return ParsedRequest(body=body, model=model, prompts=prompts, n=n, stream=stream, chat=False)


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest('\'messages\' is required: a non-empty list of {"role", "content"} objects')
    if len(messages) > 1024:
        raise BadRequest(f"'messages' holds {len(messages)} messages; at most 1024")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise BadRequest(f"messages[{i}] must be an object with a 'role' in {_ROLES}")
        if not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}].content must be a string (the guard scores text content only)")
        extra = set(m) - _MESSAGE_KEYS
        if extra:
            raise BadRequest(f"messages[{i}] has unknown keys {sorted(extra)[:3]}")
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise BadRequest(f"messages[{i}].{key} must be a string")
    return messages


def parse_chat(body: dict, tokenizer, limits: Limits | None = None) -> ParsedRequest:
    """``/v1/chat/completions``: ``messages`` is a non-empty list of {role, content} with string content."""
    limits = limits or Limits(vocab_size=_vocab_size(tokenizer))
    model = _model(body)
    check_params(body, CHAT_PARAMS, {"model", "messages"}, limits, chat=True)
    messages = _messages(body.get("messages"))
    try:
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # vLLM would reject it too; score the plain concatenation meanwhile
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    except Exception as e:  # a template that rejects these roles: vLLM would answer 400 as well
        raise BadRequest(f"the messages do not fit the model's chat template ({type(e).__name__})") from None
    n, stream = body.get("n") or 1, bool(body.get("stream"))
    return ParsedRequest(body=body, model=model, prompts=[prompt], n=n, stream=stream, chat=True)


def parse_leakage(body: dict) -> tuple[str, str]:
    """``/v1/leakage``: {"text"} (scored as a completion with no prompt) or {"prompt", "completion"}."""
    extra = set(body) - {"text", "prompt", "completion"}
    if extra:
        raise BadRequest(f"unknown keys {sorted(extra)[:3]}: send {{'text'}} or {{'prompt', 'completion'}}")
    for key in ("text", "prompt", "completion"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise BadRequest(f"'{key}' must be a string, got {type(body[key]).__name__}")
    if body.get("text") is not None:
        return "", body["text"]
    if body.get("completion") is None:
        raise BadRequest("'completion' is required (a string), or send 'text'")
    return body.get("prompt") or "", body["completion"]


def parse_tokens_call(path: str, body: dict, limits: Limits) -> dict:
    """``/tokenize`` ({"model", "prompt", ...}) and ``/detokenize`` ({"model", "tokens"}): nothing is generated,
    but vLLM answers malformed ones with a 500, so they are checked like the rest."""
    _model(body)
    if path == "/detokenize":
        allowed = {"model", "tokens"}
        token_ids("tokens", body.get("tokens"), limits)
    else:
        allowed = {"model", "prompt", "add_special_tokens", "return_token_strs"}
        if not isinstance(body.get("prompt"), str):
            raise BadRequest("'prompt' is required: a string")
        for key in ("add_special_tokens", "return_token_strs"):
            if body.get(key) is not None and not isinstance(body[key], bool):
                raise BadRequest(f"'{key}' must be true or false")
    extra = set(body) - allowed
    if extra:
        raise BadRequest(f"unknown parameter '{sorted(extra)[0][:64]}'")
    return body


def _vocab_size(tokenizer) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:  # a tokenizer without a length: vLLM checks the ids
        return None
