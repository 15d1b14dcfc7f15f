"""The request parameters the guard forwards to vLLM, each with its type and range.

A parameter not listed here is refused with 400 rather than forwarded: the guard cannot promise to score what a
parameter it does not know makes vLLM return (and vLLM answers some malformed values with a 500). Under the
``block`` policy, the parameters that return tokens the guard never scores are refused as well (``BLOCK_REFUSED``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class BadRequest(ValueError):
    """The request body is malformed; the message is the reason sent back with the 400."""


@dataclass(frozen=True)
class Limits:
    """Caps a request must keep to (GuardSettings), and what the policy forbids."""

    max_n: int = 8
    max_tokens: int = 4096
    max_prompts: int = 32
    vocab_size: int | None = None  # token ids must be below it; None: not checked here
    block: bool = False  # refuse parameters that return unscored tokens

    @classmethod
    def from_settings(cls, settings, vocab_size: int | None = None) -> Limits:
        return cls(settings.max_n, settings.max_tokens, settings.max_prompts, vocab_size, settings.policy == "block")


Check = Callable[[str, Any, Limits], None]
_INT64 = 1 << 63


def _type_name(value: Any) -> str:
    return "a boolean" if isinstance(value, bool) else type(value).__name__


def integer(lo: int, hi: int | str) -> Check:
    """An int in ``[lo, hi]``; ``hi`` may name a Limits field."""

    def check(key: str, value: Any, limits: Limits) -> None:
        top = getattr(limits, hi) if isinstance(hi, str) else hi
        if isinstance(value, bool) or not isinstance(value, int):
            what = "a positive integer" if lo >= 1 else "an integer"
            raise BadRequest(f"'{key}' must be {what}, got {_type_name(value)}")
        if value < lo:
            raise BadRequest(f"'{key}' must be >= {lo}, got {value}")
        if value > top:
            raise BadRequest(f"'{key}' must be <= {top} on this server, got {str(value)[:40]}")

    return check


def number(lo: float, hi: float, open_lo: bool = False) -> Check:
    def check(key: str, value: Any, limits: Limits) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"'{key}' must be a number, got {_type_name(value)}")
        finite = isinstance(value, int) or math.isfinite(value)  # isfinite() of a huge int overflows
        if not finite or value > hi or value < lo or (open_lo and value == lo):
            raise BadRequest(f"'{key}' must be in {'(' if open_lo else '['}{lo}, {hi}], got {str(value)[:40]}")

    return check


def boolean(key: str, value: Any, limits: Limits) -> None:
    if not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be true or false, got {_type_name(value)}")


def string(max_chars: int) -> Check:
    def check(key: str, value: Any, limits: Limits) -> None:
        if not isinstance(value, str):
            raise BadRequest(f"'{key}' must be a string, got {_type_name(value)}")
        if len(value) > max_chars:
            raise BadRequest(f"'{key}' is longer than {max_chars} characters")

    return check


def token_ids(key: str, value: Any, limits: Limits) -> None:
    """A list of token ids, each in ``[0, vocab_size)``."""
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise BadRequest(f"'{key}' must be a list of token ids (integers)")
    top = limits.vocab_size if limits.vocab_size is not None else _INT64
    bad = [t for t in value if not 0 <= t < top]
    if bad:
        raise BadRequest(f"'{key}' holds token ids outside [0, {top}): {bad[:3]}")


def _stop(key: str, value: Any, limits: Limits) -> None:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > 16 or not all(isinstance(s, str) and len(s) <= 256 for s in items):
        raise BadRequest(f"'{key}' must be a string or a list of at most 16 strings of at most 256 characters")


def _logit_bias(key: str, value: Any, limits: Limits) -> None:
    if not isinstance(value, dict) or len(value) > 300:
        raise BadRequest(f"'{key}' must be an object of at most 300 token ids to biases")
    for token, bias in value.items():
        if not token.isascii() or not token.isdigit():
            raise BadRequest(f"'{key}' keys must be token ids written as strings, got {token[:20]!r}")
        token_ids(key, [int(token)], limits)
        number(-100, 100)(f"{key}[{token}]", bias, limits)


def _stream_options(key: str, value: Any, limits: Limits) -> None:
    if not isinstance(value, dict) or set(value) - {"include_usage", "continuous_usage_stats"}:
        raise BadRequest(f"'{key}' must be an object with 'include_usage' and/or 'continuous_usage_stats'")
    for k, v in value.items():
        boolean(f"{key}.{k}", v, limits)


def _tools(key: str, value: Any, limits: Limits) -> None:
    if not isinstance(value, list) or not 0 < len(value) <= 64:
        raise BadRequest(f"'{key}' must be a list of 1 to 64 function tools")
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise BadRequest(f'{key}[{i}] must be {{"type": "function", "function": {{...}}}}')
        string(256)(f"{key}[{i}].function.name", fn.get("name"), limits)
        if set(fn) - {"name", "description", "parameters", "strict"}:
            raise BadRequest(f"{key}[{i}].function has unknown keys {sorted(set(fn) - {'name'})[:3]}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise BadRequest(f"{key}[{i}].function.parameters must be a JSON schema object")


def _tool_choice(key: str, value: Any, limits: Limits) -> None:
    if value in ("none", "auto", "required"):
        return
    fn = value.get("function") if isinstance(value, dict) else None
    if not isinstance(fn, dict) or value.get("type") != "function" or not isinstance(fn.get("name"), str):
        raise BadRequest(f"'{key}' must be 'none', 'auto', 'required' or a named function")


_COMMON: dict[str, Check] = {
    "n": integer(1, "max_n"),
    "max_tokens": integer(1, "max_tokens"),
    "temperature": number(0, 100),
    "top_p": number(0, 1, open_lo=True),
    "top_k": integer(-1, 1 << 20),
    "min_p": number(0, 1),
    "seed": integer(-_INT64, _INT64 - 1),
    "stop": _stop,
    "stream": boolean,
    "stream_options": _stream_options,
    "presence_penalty": number(-2, 2),
    "frequency_penalty": number(-2, 2),
    "repetition_penalty": number(0, 10, open_lo=True),
    "logit_bias": _logit_bias,
    "user": string(256),
    "ignore_eos": boolean,
    "min_tokens": integer(0, "max_tokens"),
    "stop_token_ids": token_ids,
    "skip_special_tokens": boolean,
    "spaces_between_special_tokens": boolean,
    "include_stop_str_in_output": boolean,
    "return_token_ids": boolean,
    "prompt_logprobs": integer(0, 20),
}
COMPLETION_PARAMS: dict[str, Check] = {**_COMMON, "logprobs": integer(0, 20), "echo": boolean}
CHAT_PARAMS: dict[str, Check] = {
    **_COMMON,
    "max_completion_tokens": integer(1, "max_tokens"),
    "logprobs": boolean,
    "top_logprobs": integer(0, 20),
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": boolean,
}

# Under "block": (parameter, is it asking for unscored tokens, why). Each returns tokens the guard never scores.
BLOCK_REFUSED: tuple[tuple[str, Callable[[Any, bool], bool], str], ...] = (
    ("logprobs", lambda v, chat: not chat and bool(v), "returns each token's top alternatives, never scored"),
    ("top_logprobs", lambda v, chat: bool(v), "returns each token's top alternatives, never scored"),
    ("prompt_logprobs", lambda v, chat: v is not None, "returns the prompt tokens' top alternatives, never scored"),
    ("echo", lambda v, chat: bool(v), "returns the prompt inside the completion text"),
)


def check_params(body: dict, params: dict[str, Check], skip: set[str], limits: Limits, chat: bool) -> None:
    """Refuse unknown parameters, values out of type or range, and (under block) unscored-token parameters."""
    for key, value in body.items():
        if key in skip or value is None:
            continue
        check = params.get(key)
        if check is None:
            raise BadRequest(f"unknown parameter '{key[:64]}': the guard forwards only parameters it checks")
        check(key, value, limits)
    if limits.block:
        for key, asks, why in BLOCK_REFUSED:
            if key in body and body[key] is not None and key in params and asks(body[key], chat):
                raise BadRequest(f"'{key}' is refused under the block policy: it {why}")
