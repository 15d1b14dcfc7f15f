"""The guard tried as an attacker would, against the session's real vLLM server on the tiny export.

Leak: under ``block``, with every answer flagged (thresholds at -1), no response, in its body, headers or any stream
event, carries a word or a token-id run of the answer vLLM gave, nor names a concept. Fuzz: thousands of generated
bodies against every endpoint get a 4xx or a 200, never a 5xx; the guard is healthy afterwards and every accepted
request is in the audit log.
"""

from __future__ import annotations

import asyncio
import http.client as httpclient
import json
import os
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import TINY_MODEL_NAME, http, sse_events
from test_serve_proxy import LowThresholds, running_guard

from serve.audit import read_records

pytestmark = pytest.mark.slow

REFUSAL = "Sorry, no."
_SCHEMA = {"type": "object", "properties": {"fact": {"type": "string"}}, "required": ["fact"]}
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a fact up.", "parameters": _SCHEMA}}]
# (endpoint, extra parameters): every way of asking for more than the text
VARIANTS = [
    ("completions", {}),
    ("completions", {"n": 3, "temperature": 1.0}),
    ("completions", {"logprobs": 0}),
    ("completions", {"logprobs": 3}),
    ("completions", {"return_token_ids": True}),
    ("completions", {"echo": True}),
    ("completions", {"prompt_logprobs": 1}),
    ("chat", {}),
    ("chat", {"n": 3, "temperature": 1.0}),
    ("chat", {"logprobs": True}),
    ("chat", {"logprobs": True, "top_logprobs": 3}),
    ("chat", {"return_token_ids": True}),
    ("chat", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "lookup"}}}),
]
REFUSED_UNDER_BLOCK = {"logprobs": 3, "echo": True, "prompt_logprobs": 1, "top_logprobs": 3}


def _request(endpoint: str, question: str, extra: dict) -> tuple[str, dict]:
    # a fixed seed makes vLLM's sampled answers (n > 1) the same bare and through the guard
    base = {"model": TINY_MODEL_NAME, "max_tokens": 12, "temperature": 0.0, "seed": 0, **extra}
    if endpoint == "chat":
        return "/v1/chat/completions", {**base, "messages": [{"role": "user", "content": question}]}
    return "/v1/completions", {**base, "prompt": question}


def _grams(ids: list[int], run: int = 3) -> set[tuple]:
    return {tuple(ids[i : i + run]) for i in range(len(ids) - run + 1)}


def _generated(body: dict) -> tuple[list[str], set[tuple]]:
    """Every generated text of a bare vLLM answer, and the runs of 3 completion token ids not in the prompt's ids
    (an answer that repeats the name asked about is not a leak of the answer)."""
    from serve import policy as pol

    texts, grams, prompt = [], set(), set(_grams(body.get("prompt_token_ids") or []))
    for c in body.get("choices", []):
        texts.append(pol.choice_text(c, "message" in c))
        grams |= _grams(c.get("token_ids") or [])
        prompt |= _grams(c.get("prompt_token_ids") or [])
    return texts, grams - prompt


def _words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z0-9]{4,}", text)}


def _values(obj) -> tuple[list[str], list[list[int]]]:
    """Every string value and every list of ints anywhere in a JSON value (keys are the server's schema)."""
    strings, int_lists = [], []
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            strings.append(v)
        elif isinstance(v, dict):
            stack += list(v.values())
        elif isinstance(v, list):
            if v and all(isinstance(x, int) for x in v):
                int_lists.append(v)
            stack += v
    return strings, int_lists


def test_block_leaks_no_part_of_a_blocked_answer_and_names_no_concept(
    tiny_vllm, tiny_scorer, tiny_tokenizer, tiny_world
):
    upstream = tiny_vllm[0]
    names = tiny_world.concepts().names()
    question = f"Where was {names[0]} born?"
    schema = {"assistant", "content", "filter", "tiny", "chat", "completion", "text", "function", "lookup", "fact"}
    harmless = _words(question + " " + REFUSAL) | schema | {"block", "blocked"}
    checked, leaks = 0, []
    with running_guard(LowThresholds(tiny_scorer, -1.0), tiny_tokenizer, upstream, policy="block", refusal=REFUSAL,
                       stream_score_every=2) as base:  # fmt: skip
        for endpoint, extra in VARIANTS:
            path, body = _request(endpoint, question, extra)
            status, _, bare = http(upstream + path, {**body, "return_token_ids": True})
            assert status == 200, (path, extra, bare)
            texts, ids = _generated(bare)
            secret = set().union(*map(_words, texts)) - harmless
            assert secret or ids, (path, extra, texts)
            for stream in (False, True):
                status, headers, out = http(base + path, {**body, "stream": stream})
                refused = any(REFUSED_UNDER_BLOCK.get(k) == v for k, v in extra.items())
                assert status == (400 if refused else 200), (path, extra, stream, out)
                parts = sse_events(out) if stream and status == 200 else [out]
                strings, int_lists = _values([parts, list(headers.values())])
                found = {w for s in strings for w in _words(s)} & secret
                runs = [r for r in int_lists if _grams(r) & ids]
                named = [n for n in names if any(n in s or n.split()[-1] in s for s in strings)]
                if found or runs or named:
                    leaks.append((path, extra, stream, found, runs[:1], named))
                checked += 1
    assert checked == 2 * len(VARIANTS)
    assert not leaks, leaks
    # the same detector on the same request under monitor finds the answer: the check above is not vacuous
    with running_guard(LowThresholds(tiny_scorer, -1.0), tiny_tokenizer, upstream, disclose="full") as base:
        path, body = _request("chat", question, {"logprobs": True, "return_token_ids": True})
        texts, ids = _generated(http(upstream + path, body)[2])
        strings, int_lists = _values(http(base + path, body)[2])
    assert {w for s in strings for w in _words(s)} & (set().union(*map(_words, texts)) - harmless)
    assert any(_grams(r) & ids for r in int_lists) and any(names[0] in s for s in strings)


def _mutations(rng: random.Random):
    junk = [None, True, -1, 0, 2**70, -(10**30), 1e308, "x", "\u00e9" * 3, [], {}, [1, -2], [[1], [2**40]],
            {"a": [1]}, "9" * 50, 0.5, [{"role": "user"}], [{"role": "user", "content": 5}]]  # fmt: skip
    keys = ["model", "prompt", "messages", "n", "max_tokens", "logprobs", "top_logprobs", "echo", "stop", "seed",
            "logit_bias", "tools", "tool_choice", "stream", "stream_options", "return_token_ids", "temperature",
            "top_p", "top_k", "min_tokens", "stop_token_ids", "prompt_logprobs", "vllm_xargs", "unknown",
            "tokens", "text", "completion"]  # fmt: skip
    return junk, keys


def _body(rng: random.Random, path: str) -> bytes:
    """A valid body for ``path`` with up to three mutations, or raw junk (bytes, nesting, huge numbers)."""
    roll = rng.random()
    if roll < 0.06:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    if roll < 0.09:
        depth = rng.choice([40, 5000])
        return b'{"model":' + b"[" * depth + b"]" * depth + b"}"
    if roll < 0.12:
        return b'{"model": "tiny", "prompt": "a", "max_tokens": ' + b"7" * rng.choice([20, 5000]) + b"}"
    if roll < 0.15:
        return b'{"model": "tiny", "prompt": "\\ud800 x", "messages": [{"role": "user", "content": "\\udfff"}]}'
    body = {"model": TINY_MODEL_NAME, "max_tokens": 4}
    body.update({"/v1/completions": {"prompt": "Where?"}, "/tokenize": {"prompt": "hi"},
                 "/detokenize": {"tokens": [5, 6]}, "/v1/leakage": {"text": "hello"}}.get(path, {}))  # fmt: skip
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "Who?"}]
    junk, keys = _mutations(rng)
    for _ in range(rng.randint(0, 3)):
        if rng.random() < 0.2 and body:
            body.pop(rng.choice(list(body)))
        else:
            body[rng.choice(keys)] = rng.choice(junk + [rng.randint(1, 3), False])
    return json.dumps(body).encode()


def _send(port: int, method: str, path: str, raw: bytes, headers: dict) -> tuple[int, str | None]:
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=raw if method == "POST" else None, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("X-Request-Id")
    finally:
        conn.close()


def test_fuzz_every_endpoint_no_5xx_healthy_and_audited(tiny_vllm, tiny_scorer, tiny_tokenizer, tmp_path):
    paths = ["/v1/completions", "/v1/chat/completions", "/v1/leakage", "/tokenize", "/detokenize", "/v1/models",
             "/metrics", "/health", "/nowhere"]  # fmt: skip
    db = tmp_path / "audit.sqlite"
    rng = random.Random(1)
    cases = []
    for _ in range(5000):
        path = rng.choice(paths)
        key = "op" if path in ("/v1/leakage", "/metrics") else "client"
        auth = rng.choice([f"Bearer {key}"] * 8 + ["Bearer \u00ff\u00fe", "", "Basic x", "Bearer wrong"])
        method = "GET" if path in ("/v1/models", "/metrics", "/health") and rng.random() < 0.9 else "POST"
        cases.append((method, path, _body(rng, path), {"Authorization": auth, "Content-Type": "application/json"}))
    settings = dict(api_key="client", operator_key="op", max_tokens=8, max_n=2, policy="block", stream_score_every=2)
    with running_guard(tiny_scorer, tiny_tokenizer, tiny_vllm[0], db, **settings) as base:
        port = int(base.rsplit(":", 1)[1])
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda c: (c[1], *_send(port, *c)), cases))
        healthy = http(base + "/health")[0]
        after = http(base + "/v1/completions", {"model": TINY_MODEL_NAME, "prompt": "Hi", "max_tokens": 2},
                     key="client")[0]  # fmt: skip
    statuses = [s for _, s, _ in results]
    assert not [r for r in results if r[1] >= 500], sorted({(p, s) for p, s, _ in results if s >= 500})
    assert healthy == 200 and after == 200
    accepted = {rid for p, s, rid in results if s == 200 and p in ("/v1/completions", "/v1/chat/completions")}
    assert len(accepted) >= 100 and statuses.count(400) >= 1000  # both paths were exercised
    audited = {r.request_id.split("#")[0] for r in read_records(db)}
    assert accepted <= audited, f"{len(accepted - audited)} accepted requests not audited"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vllm_running(upstream: str) -> float:
    _, _, text = http(upstream + "/metrics")
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:num_requests_running")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def _impatient_client(port: int, body: bytes, stop_after: int) -> str | None:
    """Stream a completion and hang up after ``stop_after`` bytes; the guard's request id if headers came."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        sock.sendall(head + body)
        got = b""
        while len(got) < stop_after:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
    found = re.search(rb"X-Request-Id: (\S+)", got)
    return found.group(1).decode() if found else None


def test_streams_that_disconnect_at_random_leave_nothing_behind(tiny_vllm, tiny_capture_socket, tiny_world, tmp_path):
    from serve.capture import CaptureClient
    from serve.launch import close_guard, guard_in_thread, make_guard
    from serve.settings import GuardSettings

    upstream, export = tiny_vllm
    db = tmp_path / "audit.sqlite"
    settings = GuardSettings(upstream_url=upstream, port=0, policy="block", stream_score_every=4, audit_path=str(db))
    guard = make_guard(export, settings, backend="capture", capture_socket=tiny_capture_socket)
    names = tiny_world.concepts().names()
    rng = random.Random(2)
    try:
        with guard_in_thread(guard) as url:
            port = int(url.rsplit(":", 1)[1])
            loop = guard.batcher._task.get_loop()

            def tasks() -> int:
                async def count():
                    return len(asyncio.all_tasks())

                return asyncio.run_coroutine_threadsafe(count(), loop).result(10)

            def body(i: int) -> bytes:
                prompt = f"Where was {names[i % len(names)]} born?"
                return json.dumps({"model": TINY_MODEL_NAME, "prompt": prompt, "max_tokens": 48, "temperature": 0.8,
                                   "seed": i, "stream": True}).encode()  # fmt: skip

            for i in range(20):  # warm-up: every code path once, so the baseline holds its caches
                _impatient_client(port, body(i), 1 << 30)
            tasks0, threads0, rss0 = tasks(), threading.active_count(), _rss_bytes()
            stops = [rng.choice([0, 1, 200, 600, 1500, 1 << 30]) for _ in range(200)]
            with ThreadPoolExecutor(200) as pool:
                ids = list(pool.map(lambda i: _impatient_client(port, body(i), stops[i]), range(200)))
            deadline = time.time() + 60
            while (guard.active or _vllm_running(upstream)) and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # the last handlers return after their audit write
            assert guard.active == 0 and _vllm_running(upstream) == 0  # no upstream request left running
            assert tasks() <= tasks0, "tasks left on the guard's loop"
            left = [t.name for t in threading.enumerate()]
            assert threading.active_count() <= threads0 + 1, left  # +1: the capture-release thread starts lazily
            client = CaptureClient(tiny_capture_socket)
            client.fetch([], release=False)
            assert client.stored == 0, "captured rows left in vLLM"
            assert _rss_bytes() <= 1.10 * rss0, (rss0, _rss_bytes())
        audited = {r.request_id.split("#")[0] for r in read_records(db)}
        delivered = {rid for rid in ids if rid}
        assert len(delivered) >= 100 and delivered <= audited, len(delivered - audited)
    finally:
        close_guard(guard)
