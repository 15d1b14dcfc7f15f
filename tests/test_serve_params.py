"""Request validation: every malformed body is a BadRequest (a 400), never another exception; caps and the block
policy's refusals name the parameter."""

from __future__ import annotations

import json
import random

import pytest

from serve.params import Limits
from serve.validate import BadRequest, parse_chat, parse_completion, parse_json, parse_leakage


class _Tok:
    """A tokenizer of 100 ids whose decode fails on ids it does not have, as a real one does."""

    chat_template = "yes"

    def __len__(self):
        return 100

    def decode(self, ids):
        if any(not 0 <= i < 100 for i in ids):
            raise OverflowError("out of range integral type conversion attempted")
        return " ".join(f"t{i}" for i in ids)

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)


LIMITS = Limits(max_n=4, max_tokens=64, max_prompts=3, vocab_size=100)
BLOCK = Limits(max_n=4, max_tokens=64, max_prompts=3, vocab_size=100, block=True)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"[" * 5000 + b"]" * 5000, "nests deeper"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nests deeper than 32"),
        (b'{"n": ' + b"9" * 5000 + b"}", "not usable JSON"),
        (b'{"model": "m", "prompt": "\\ud800"}', "lone surrogate"),
        (b'{"\\udfff": 1}', "lone surrogate"),
        (b'{"temperature": NaN}', "not valid JSON"),
        (b'{"temperature": 1e999}', "too large for a float"),
    ],
)
def test_parse_json_refuses_what_would_crash_later(raw, match):
    with pytest.raises(BadRequest, match=match):
        parse_json(raw)


@pytest.mark.parametrize(
    "body, match",
    [
        ({"model": "m", "prompt": [-1, 2]}, r"token ids outside \[0, 100\)"),
        ({"model": "m", "prompt": [[5], [100]]}, r"outside \[0, 100\)"),
        ({"model": "m", "prompt": ["a", "b", "c", "d"]}, "holds 4 prompts; at most 3"),
        ({"model": "m", "prompt": "hi", "n": 5}, "'n' must be <= 4 on this server"),
        ({"model": "m", "prompt": "hi", "max_tokens": 10**30}, "'max_tokens' must be <= 64"),
        ({"model": "m", "prompt": "hi", "vllm_xargs": {"atu_capture": "x"}}, "unknown parameter 'vllm_xargs'"),
        ({"model": "m", "prompt": "hi", "logit_bias": {"-3": 1}}, "keys must be token ids"),
        ({"model": "m", "prompt": "hi", "stop": ["a"] * 17}, "at most 16 strings"),
        ({"model": "m", "prompt": "hi", "top_p": 0}, r"'top_p' must be in \(0, 1\]"),
        ({"model": "m", "prompt": "hi", "seed": 2**64}, "'seed' must be <="),
    ],
)
def test_parse_completion_refuses(body, match):
    with pytest.raises(BadRequest, match=match):
        parse_completion(body, _Tok(), LIMITS)


@pytest.mark.parametrize(
    "body, chat, match",
    [
        ({"logprobs": 2}, False, "'logprobs' is refused under the block policy"),
        ({"echo": True}, False, "'echo' is refused under the block policy"),
        ({"prompt_logprobs": 0}, False, "'prompt_logprobs' is refused"),
        ({"logprobs": True, "top_logprobs": 3}, True, "'top_logprobs' is refused under the block policy"),
    ],
)
def test_block_refuses_parameters_that_return_unscored_tokens(body, chat, match):
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} if chat else {"model": "m", "prompt": "hi"}
    parse = parse_chat if chat else parse_completion
    parse({**base, **body}, _Tok(), LIMITS)  # monitor: allowed
    with pytest.raises(BadRequest, match=match):
        parse({**base, **body}, _Tok(), BLOCK)


def test_block_allows_what_is_scored():
    # the sampled tokens' own logprobs and ids are the scored tokens; tools' arguments are scored like content
    parse_completion({"model": "m", "prompt": "hi", "logprobs": 0, "return_token_ids": True}, _Tok(), BLOCK)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "tools": tools,
            "tool_choice": "required", "n": 3}  # fmt: skip
    assert parse_chat(body, _Tok(), BLOCK).n == 3


def test_parse_leakage_refuses_unknown_keys():
    with pytest.raises(BadRequest, match="unknown keys"):
        parse_leakage({"text": "a", "extra": 1})


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "bigint", "neg", "float", "str", "surrogate", "bool", "null", "list", "dict", "ids"]
    kind = rng.choice(kinds if depth < 3 else kinds[:8])
    return {
        "int": lambda: rng.randint(-5, 200),
        "bigint": lambda: 10 ** rng.randint(18, 400),
        "neg": lambda: -(10 ** rng.randint(1, 30)),
        "float": lambda: rng.choice([0.5, -1e308, 1e300, 2.0]),
        "str": lambda: rng.choice(["", "hi", "x" * 300, "é", "\x00"]),
        "surrogate": lambda: "a\ud800b",
        "bool": lambda: rng.random() < 0.5,
        "null": lambda: None,
        "list": lambda: [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
        "dict": lambda: {rng.choice(["role", "content", "x"]): _random_value(rng, depth + 1)},
        "ids": lambda: [rng.randint(-3, 120) for _ in range(3)],
    }[kind]()


def test_fuzzed_bodies_are_parsed_or_refused_with_bad_request():
    """Generated bodies through the same steps as the handlers: parse_json, then the endpoint's parser."""
    rng = random.Random(0)
    keys = ["model", "prompt", "messages", "n", "max_tokens", "logprobs", "top_logprobs", "echo", "stop", "seed",
            "logit_bias", "tools", "tool_choice", "stream", "return_token_ids", "temperature"]  # fmt: skip
    outcomes = {"ok": 0, "bad": 0}
    for i in range(3000):
        body = {k: _random_value(rng) for k in rng.sample(keys, rng.randint(0, 6))}
        if rng.random() < 0.5:
            body["model"] = "m"
        raw = json.dumps(body).encode("utf-8", "surrogatepass")
        for parse in (parse_completion, parse_chat):
            try:
                parse(parse_json(raw), _Tok(), BLOCK if i % 2 else LIMITS)
                outcomes["ok"] += 1
            except BadRequest:
                outcomes["bad"] += 1
    assert outcomes["bad"] > 0 and outcomes["ok"] + outcomes["bad"] == 6000
