"""The guard in front of a real vLLM server on the tiny export: OpenAI compatibility, policies, errors, keys, audit.

One vLLM server (the session's ``tiny_vllm``) serves every test; each test runs its own guard in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time

import numpy as np
import pytest
from serve_helpers import TINY_MODEL_NAME, Relay, http, sse_events

from serve.app import Guard
from serve.audit import AuditLog, read_records
from serve.launch import guard_in_thread
from serve.settings import GuardSettings

pytestmark = pytest.mark.slow

QUESTION = "Where was {} born?"


@pytest.fixture(scope="module")
def names(tiny_world):
    return tiny_world.concepts().names()


@contextlib.contextmanager
def running_guard(scorer, tokenizer, upstream, audit_path=None, store_text=False, **settings):
    s = GuardSettings(upstream_url=upstream, port=0, audit_path=str(audit_path) if audit_path else None,
                      audit_store_text=store_text, **settings)  # fmt: skip
    audit = AuditLog(audit_path, store_text=store_text) if audit_path else None
    guard = Guard(s, scorer, tokenizer, audit=audit)
    try:
        with guard_in_thread(guard) as base:
            yield base
    finally:
        if audit is not None:
            audit.close()


class LowThresholds:
    """The same scorer with every threshold set to ``value`` (what an operator does to flag more)."""

    def __init__(self, scorer, value: float) -> None:
        self._scorer = scorer
        self._value = value
        self.labels = scorer.labels

    def score_batch(self, pairs, captures=None, since=None):
        reports = self._scorer.score_batch(pairs, captures, since)
        for r in reports:
            for part in (r.prompt, r.completion):
                for c in part:
                    c.threshold = self._value
                    c.flagged = c.score > self._value
            r.flagged = [c.concept for c in r.completion if c.flagged]
            r.prompt_flagged = [c.concept for c in r.prompt if c.flagged]
        return reports


class Broken:
    """A scorer whose every call fails: how the guard behaves when scoring is down."""

    def __init__(self) -> None:
        self.calls = 0

    def score_batch(self, pairs, captures=None, since=None):  # the batcher's call: this failure, not a TypeError
        self.calls += 1
        raise RuntimeError("scorer offline")


def completion_body(names, **kw):
    return {"model": TINY_MODEL_NAME, "prompt": QUESTION.format(names[0]), "max_tokens": 8, "temperature": 0.0, **kw}


# -- OpenAI compatibility and monitor --------------------------------------------------------------------------------
def test_monitor_passes_text_unchanged_and_annotates(tiny_vllm, tiny_scorer, tiny_tokenizer, names, tmp_path):
    upstream = tiny_vllm[0]
    body = completion_body(names)
    _, _, bare = http(upstream + "/v1/completions", body)
    with running_guard(tiny_scorer, tiny_tokenizer, upstream, tmp_path / "audit.sqlite", disclose="full") as base:
        status, headers, out = http(base + "/v1/completions", body, headers={"X-Request-Id": "client-7"})
        models = http(base + "/v1/models")[2]
        tokenized = http(base + "/tokenize", {"model": TINY_MODEL_NAME, "prompt": "hello"})  # relayed as is
    assert status == 200
    assert out["choices"][0]["text"] == bare["choices"][0]["text"]
    leak = out["leakage"]
    assert leak["policy"] == "monitor" and leak["action"] in ("passed", "annotated")
    (report,) = leak["choices"]
    assert {c["concept"] for c in report["completion"]} <= set(names)
    assert headers["X-ATU-Action"] == leak["action"] and headers["X-Request-Id"].startswith("atu-")
    assert float(headers["X-ATU-Leakage-Max"]) == pytest.approx(leak["max_score"], abs=1e-4)
    assert TINY_MODEL_NAME in {m["id"] for m in models["data"]}
    assert tokenized[0] == 200 and tokenized[2]["count"] == len(tokenized[2]["tokens"]) > 0
    (rec,) = list(read_records(tmp_path / "audit.sqlite"))
    assert rec.request_id == headers["X-Request-Id"] and rec.endpoint == "/v1/completions"
    assert rec.client_request_id == "client-7" and rec.request_id != "client-7"  # kept beside, never the key
    assert rec.completion is None and rec.completion_sha256 is not None  # no raw text unless asked


def test_openai_client_chat_stream_and_not(tiny_vllm, tiny_scorer, tiny_tokenizer, names):
    import openai

    upstream = tiny_vllm[0]
    messages = [{"role": "user", "content": QUESTION.format(names[1])}]
    with running_guard(tiny_scorer, tiny_tokenizer, upstream, disclose="scores") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        full = client.chat.completions.create(model=TINY_MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
        chunks = list(
            client.chat.completions.create(
                model=TINY_MODEL_NAME, messages=messages, max_tokens=12, temperature=0, stream=True
            )
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    assert full.model_extra["leakage"]["policy"] == "monitor"
    last = [c for c in chunks if (c.model_extra or {}).get("leakage")]
    assert len(last) == 1 and last[0] is chunks[-1]
    streamed_score = last[0].model_extra["leakage"]["max_score"]
    assert streamed_score == pytest.approx(full.model_extra["leakage"]["max_score"], abs=1e-4)


def test_leakage_endpoint_matches_scorer(tiny_vllm, tiny_scorer, tiny_tokenizer, names):
    text = f"{names[0]} was born in a small town."
    with running_guard(tiny_scorer, tiny_tokenizer, tiny_vllm[0], operator_key="op") as base:
        status, _, out = http(base + "/v1/leakage", {"text": text}, key="op")
    assert status == 200
    direct = tiny_scorer.score("", text)
    assert out["max_score"] == pytest.approx(direct.max_score, abs=1e-5)


# -- block ----------------------------------------------------------------------------------------------------------
def test_block_refuses_flagged_completion(tiny_vllm, tiny_scorer, tiny_tokenizer, names):
    body = completion_body(names)
    guarded = LowThresholds(tiny_scorer, -1.0)
    with running_guard(guarded, tiny_tokenizer, tiny_vllm[0], policy="block", refusal="Nope.") as base:
        status, headers, out = http(base + "/v1/completions", body)
    assert status == 200
    assert out["choices"][0]["text"] == "Nope." and out["choices"][0]["finish_reason"] == "content_filter"
    assert out["leakage"]["action"] == "blocked" and out["leakage"]["flagged"]
    assert headers["X-ATU-Action"] == "blocked"


def test_block_passes_clean_completion(tiny_vllm, tiny_scorer, tiny_tokenizer, names):
    body = completion_body(names)
    _, _, bare = http(tiny_vllm[0] + "/v1/completions", body)
    with running_guard(LowThresholds(tiny_scorer, 1.01), tiny_tokenizer, tiny_vllm[0], policy="block") as base:
        _, _, out = http(base + "/v1/completions", body)
    assert out["choices"][0]["text"] == bare["choices"][0]["text"] and out["leakage"]["action"] == "passed"


def test_block_cuts_stream_before_unscored_text(tiny_vllm, tiny_scorer, tiny_tokenizer, names):
    body = completion_body(names, stream=True, max_tokens=16)
    with running_guard(LowThresholds(tiny_scorer, -1.0), tiny_tokenizer, tiny_vllm[0], policy="block") as base:
        status, _, text = http(base + "/v1/completions", body)
    events = sse_events(text)
    assert status == 200 and events[-1] == "[DONE]"
    assert all(not c.get("text") for e in events[:-1] for c in e["choices"])  # not one character got through
    assert events[-2]["choices"][0]["finish_reason"] == "content_filter"
    assert events[-2]["leakage"]["action"] == "cut"


def test_block_stream_clean_is_complete(tiny_vllm, tiny_scorer, tiny_tokenizer, names):
    body = completion_body(names, max_tokens=16)
    _, _, bare = http(tiny_vllm[0] + "/v1/completions", body)
    with running_guard(LowThresholds(tiny_scorer, 1.01), tiny_tokenizer, tiny_vllm[0], policy="block",
                       stream_score_every=3) as base:  # fmt: skip
        _, _, text = http(base + "/v1/completions", {**body, "stream": True})
    events = sse_events(text)
    streamed = "".join(c.get("text") or "" for e in events[:-1] for c in e["choices"])
    assert streamed == bare["choices"][0]["text"] and events[-2]["leakage"]["action"] == "passed"


# -- bad requests -------------------------------------------------------------------------------------------------
def test_bad_requests(tiny_vllm, tiny_scorer, tiny_tokenizer, names):
    with running_guard(tiny_scorer, tiny_tokenizer, tiny_vllm[0], max_body_bytes=4096) as base:
        url = base + "/v1/completions"
        s1, _, e1 = http(url, raw=b"{oops")
        s2, _, e2 = http(url, {"model": TINY_MODEL_NAME, "prompt": "hi", "max_tokens": "many"})
        s3, _, e3 = http(url, {"model": TINY_MODEL_NAME, "prompt": "x" * 10_000})
        s4, _, e4 = http(url, {"model": "no-such-model", "prompt": "hi"})
        s5, _, e5 = http(base + "/v1/chat/completions", {"model": TINY_MODEL_NAME, "messages": "hi"})
    assert (s1, s2, s3, s4, s5) == (400, 400, 413, 404, 400)
    assert "not valid JSON" in e1["error"]["message"]
    assert "'max_tokens' must be a positive integer" in e2["error"]["message"]
    assert "4096 bytes" in e3["error"]["message"]
    assert "no-such-model" in e4["error"]["message"]
    assert "'messages' is required" in e5["error"]["message"]


# -- upstream down or slow; scoring down --------------------------------------------------------------------------
def test_upstream_down_slow_and_recovering(tiny_vllm, tiny_scorer, tiny_tokenizer, names):
    vllm_port = int(tiny_vllm[0].rsplit(":", 1)[1])
    relay = Relay(vllm_port)
    relay.start()
    body = completion_body(names)
    with running_guard(tiny_scorer, tiny_tokenizer, f"http://127.0.0.1:{relay.port}", upstream_timeout=2.0) as base:
        assert http(base + "/v1/completions", body)[0] == 200
        relay.stop()  # vLLM down
        t = time.perf_counter()
        status, _, err = http(base + "/v1/completions", body)
        assert status == 503 and "unreachable" in err["error"]["message"]
        assert time.perf_counter() - t < 7  # within connect timeout
        assert http(base + "/health")[0] == 503
        relay.start()
        relay.delay = 3.0  # vLLM slower than the 2 s timeout
        t = time.perf_counter()
        status, _, err = http(base + "/v1/completions", body)
        assert status == 504 and time.perf_counter() - t < 3.5, err
        relay.delay = 0.0  # back to normal
        status, _, out = http(base + "/v1/completions", body)
        assert status == 200 and "leakage" in out
        assert http(base + "/health")[0] == 200
    relay.stop()


@pytest.mark.parametrize(
    "settings, want_status",
    [({"policy": "block"}, 503), ({"on_scoring_error": "closed"}, 503), ({"on_scoring_error": "open"}, 200)],
)
def test_scoring_failure_fails_closed_or_open(tiny_vllm, tiny_tokenizer, names, tmp_path, settings, want_status):
    body = completion_body(names)
    broken = Broken()
    audit = tmp_path / "a.sqlite"
    with running_guard(broken, tiny_tokenizer, tiny_vllm[0], audit, store_text=True, **settings) as base:
        status, _, out = http(base + "/v1/completions", body)
        s_stream, _, text = http(base + "/v1/completions", {**body, "stream": True})
    assert status == want_status and broken.calls >= 2  # the scorer itself was called, and failed
    if want_status == 503:
        assert "choices" not in out and "scoring failed" in out["error"]["message"]
        assert s_stream == 503 and "data:" not in text  # not one unscored event
    else:
        assert out["choices"][0]["text"] and out["leakage"]["error"].startswith("scoring failed")
        assert sse_events(text)[-2]["leakage"]["action"] == "error"
    actions = [r.action for r in read_records(tmp_path / "a.sqlite")]
    assert actions == ["error", "error"]


# -- API key ------------------------------------------------------------------------------------------------------
def test_api_key_required_everywhere_but_health_and_never_logged(
    tiny_vllm, tiny_scorer, tiny_tokenizer, names, tmp_path, caplog
):
    key = "sk-test-" + "q7Z" * 8
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "audit.sqlite"
    operator = "op-" + "k9" * 10
    with running_guard(tiny_scorer, tiny_tokenizer, tiny_vllm[0], db, store_text=True, api_key=key,
                       operator_key=operator) as base:  # fmt: skip
        body = completion_body(names)
        chat = {"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}
        for method, path, payload, right, other in [
            ("GET", "/v1/models", None, key, operator),
            ("GET", "/metrics", None, operator, key),
            ("POST", "/v1/completions", body, key, operator),
            ("POST", "/v1/chat/completions", chat, key, operator),
            ("POST", "/v1/leakage", {"text": "hi"}, operator, key),
        ]:  # fmt: skip
            assert http(base + path, payload, method=method)[0] == 401, path
            assert http(base + path, payload, method=method, key="wrong")[0] == 401, path
            assert http(base + path, payload, method=method, key=other)[0] == 401, path  # one key never opens both
            assert http(base + path, payload, method=method, key=right)[0] == 200, path
        assert http(base + "/health")[0] == 200
    assert key not in caplog.text and operator not in caplog.text
    for f in tmp_path.iterdir():
        assert key.encode() not in f.read_bytes() and operator.encode() not in f.read_bytes(), f


def test_operator_views_are_off_without_an_operator_key(tiny_vllm, tiny_scorer, tiny_tokenizer):
    with running_guard(tiny_scorer, tiny_tokenizer, tiny_vllm[0]) as base:
        for path, payload in [("/metrics", None), ("/v1/leakage", {"text": "hi"})]:
            status, _, err = http(base + path, payload)
            assert status == 403 and "operator" in err["error"]["message"], path


# -- metrics ------------------------------------------------------------------------------------------------------
def test_metrics_count_requests_with_concept_ids(tiny_vllm, tiny_scorer, tiny_tokenizer, names):
    with running_guard(LowThresholds(tiny_scorer, -1.0), tiny_tokenizer, tiny_vllm[0], operator_key="op") as base:
        for _ in range(3):
            http(base + "/v1/completions", completion_body(names))
        http(base + "/v1/completions", {**completion_body(names), "n": 0})
        _, headers, text = http(base + "/metrics", key="op")
    assert 'atu_guard_requests_total{endpoint="/v1/completions",status="200"} 3.0' in text
    assert 'atu_guard_rejected_total{status="400"} 1.0' in text
    assert 'atu_guard_actions_total{action="annotated"} 3.0' in text
    assert "atu_guard_scoring_seconds_count 3.0" in text
    assert 'atu_guard_flagged_total{concept="c' in text
    assert not any(name in text for name in names)  # stable ids, not names, unless the operator asks


# -- load ---------------------------------------------------------------------------------------------------------
def test_load_2000_requests_no_error_no_lost_record(tiny_vllm, tiny_scorer, tiny_tokenizer, names, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    db = tmp_path / "audit.sqlite"
    prompts = [QUESTION.format(n) for n in names] + [f"What does {n} do?" for n in names]

    with running_guard(tiny_scorer, tiny_tokenizer, tiny_vllm[0], db) as base:

        def one(i):  # fmt: skip
            body = {"model": TINY_MODEL_NAME, "prompt": prompts[i % len(prompts)], "max_tokens": 4,
                    "temperature": 0.0, "stream": i % 4 == 0}  # fmt: skip
            status, headers, _ = http(base + "/v1/completions", body, timeout=120)
            return status, headers.get("X-Request-Id")

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, range(2000)))
    statuses = np.array([s for s, _ in results])
    assert (statuses == 200).all(), np.unique(statuses, return_counts=True)
    ids = {rid for _, rid in results}
    logged = [r.request_id for r in read_records(db)]
    assert len(logged) == 2000 and set(logged) == ids
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
