"""Validation of OpenAI-style request bodies before they reach vLLM, and the prompt text the model will see.

A bad body is answered here with 400 and a reason, so the guard never forwards something it cannot score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class BadRequest(ValueError):
    """The request body is malformed; the message is the reason sent back with the 400."""


@dataclass
class ParsedRequest:
    body: dict  # the JSON body, forwarded unchanged
    model: str
    prompts: list[str]  # the text the model is given, one per prompt (chat: the rendered template)
    n: int  # choices per prompt
    stream: bool
    chat: bool


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _check_type(body: dict, key: str, types: tuple, what: str, required: bool = False) -> Any:
    if key not in body or body[key] is None:
        if required:
            raise BadRequest(f"'{key}' is required ({what})")
        return None
    value = body[key]
    if isinstance(value, bool) and bool not in types:
        raise BadRequest(f"'{key}' must be {what}, got a boolean")
    if not isinstance(value, types):
        raise BadRequest(f"'{key}' must be {what}, got {type(value).__name__}")
    return value


def _common(body: dict) -> tuple[str, int, bool]:
    model = _check_type(body, "model", (str,), "a model name (see /v1/models)", required=True)
    n = _check_type(body, "n", (int,), "a positive integer") or 1
    if n < 1:
        raise BadRequest(f"'n' must be >= 1, got {n}")
    max_tokens = _check_type(body, "max_tokens", (int,), "a positive integer")
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest(f"'max_tokens' must be >= 1, got {max_tokens}")
    for key in ("temperature", "top_p"):
        _check_type(body, key, (int, float), "a number")
    stream = _check_type(body, "stream", (bool,), "true or false") or False
    return model, n, stream


def _token_list(value: list, what: str) -> bool:
    """True when ``value`` is a list of token ids; a list mixing ids and other things is an error."""
    ints = [isinstance(v, int) and not isinstance(v, bool) for v in value]
    if all(ints):
        return True
    if any(ints):
        raise BadRequest(f"{what} mixes token ids with other values")
    return False


def parse_completion(body: dict, tokenizer) -> ParsedRequest:
    """``/v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids or a list of such lists."""
    model, n, stream = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        if _token_list(prompt, "'prompt'"):
            prompts = [tokenizer.decode(prompt)]
        elif all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif all(isinstance(p, list) and p and _token_list(p, "'prompt'") for p in prompt):
            prompts = [tokenizer.decode(p) for p in prompt]
        else:
            raise BadRequest("'prompt' must be a string, a list of strings or a list of token-id lists")
    else:
        raise BadRequest("'prompt' is required: a non-empty string, list of strings or token ids")
    return ParsedRequest(body=body, model=model, prompts=prompts, n=n, stream=stream, chat=False)


def parse_chat(body: dict, tokenizer) -> ParsedRequest:
    """``/v1/chat/completions``: ``messages`` is a non-empty list of {role, content} with string content."""
    model, n, stream = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest('\'messages\' is required: a non-empty list of {"role", "content"} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'")
        if not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}].content must be a string (the guard scores text content only)")
    try:
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # vLLM would reject it too; score the plain concatenation meanwhile
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    except Exception as e:  # a template that rejects these roles: vLLM would answer 400 as well
        raise BadRequest(f"the messages do not fit the model's chat template ({e})") from None
    return ParsedRequest(body=body, model=model, prompts=[prompt], n=n, stream=stream, chat=True)


def parse_leakage(body: dict) -> tuple[str, str]:
    """``/v1/leakage``: {"text"} (scored as a completion with no prompt) or {"prompt", "completion"}."""
    if "text" in body:
        text = _check_type(body, "text", (str,), "a string", required=True)
        return "", text
    prompt = _check_type(body, "prompt", (str,), "a string") or ""
    completion = _check_type(body, "completion", (str,), "a string", required=True)
    return prompt, completion
