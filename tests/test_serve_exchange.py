"""The guard's exchange (hold, score, release, cut, block, fail, audit) against a fake OpenAI upstream: no vLLM, no
trained model, milliseconds per test. The scorer is the real one over a byte tokenizer and a table of hidden states
(``toy_scorer``): a completion leaks the concept "Quinn" when it holds a "Q" before its last character."""

from __future__ import annotations

import contextlib

import pytest
from serve_helpers import FakeOpenAI, http, sse_events
from toy_scorer import ByteTokenizer, byte_id, toy_scorer

from atu.errors import ConfigError
from serve.app import Guard
from serve.audit import AuditLog, read_records
from serve.launch import guard_in_thread
from serve.scoring import RESCORE_CHARS
from serve.settings import GuardSettings

CLEAN = ["the ", "story ", "of ", "a ", "quiet ", "town"]
LEAK = ["the ", "story ", "of ", "Quinn ", "is ", "long"]


class Broken:
    """A scorer whose every call fails."""

    labels = ["Quinn"]

    def score_batch(self, pairs, captures=None, since=None):
        raise RuntimeError("scorer offline")


@pytest.fixture
def upstream():
    fake = FakeOpenAI(CLEAN)
    yield fake
    fake.close()


@contextlib.contextmanager
def guard(upstream, tmp_path, scorer=None, **settings):
    """A guard in front of ``upstream`` with an audit log; yields (base URL, audit log path)."""
    path = tmp_path / "audit.db"
    s = GuardSettings(upstream_url=upstream.url, port=0, disclose="full", audit_path=str(path), **settings)
    scorer = scorer or toy_scorer({"Quinn": byte_id("Q")}, max_tokens=4096, top_k=5)
    with AuditLog(path) as audit, guard_in_thread(Guard(s, scorer, ByteTokenizer(), audit=audit)) as base:
        yield base, path


def ask(base, chat=False, stream=False, **extra):
    if chat:
        body = {"model": "m", "messages": [{"role": "user", "content": "Tell me a story."}], "stream": stream}
        return http(base + "/v1/chat/completions", {**body, **extra})
    return http(base + "/v1/completions", {"model": "m", "prompt": "Tell me a story.", "stream": stream, **extra})


def streamed_text(events, chat) -> str:
    key = (lambda c: (c.get("delta") or {}).get("content") or "") if chat else (lambda c: c.get("text") or "")
    return "".join(key(c) for e in events if isinstance(e, dict) for c in e.get("choices", []))


def actions(path) -> list[str]:
    return [r.action for r in read_records(path)]


# -- not streamed --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True])
def test_monitor_annotates_a_leak_and_passes_the_text(upstream, tmp_path, chat):
    upstream.chunks = LEAK
    with guard(upstream, tmp_path) as (base, path):
        status, headers, out = ask(base, chat)
    assert status == 200 and out["leakage"]["action"] == "annotated" and out["leakage"]["flagged"] == ["Quinn"]
    choice = out["choices"][0]
    assert (choice["message"]["content"] if chat else choice["text"]) == "".join(LEAK)
    assert headers["X-ATU-Action"] == "annotated" and actions(path) == ["annotated"]


def test_monitor_passes_a_clean_answer(upstream, tmp_path):
    with guard(upstream, tmp_path) as (base, path):
        status, _, out = ask(base)
    assert status == 200 and out["leakage"]["action"] == "passed" and out["choices"][0]["text"] == "".join(CLEAN)
    assert actions(path) == ["passed"]
    (sent,) = upstream.requests  # forwarded as asked: no capture backend, so not marked for it
    assert sent["prompt"] == "Tell me a story." and "vllm_xargs" not in sent and "return_token_ids" not in sent


@pytest.mark.parametrize("chat", [False, True])
def test_block_replaces_a_leaking_answer(upstream, tmp_path, chat):
    upstream.chunks = LEAK
    with guard(upstream, tmp_path, policy="block") as (base, path):
        status, _, out = ask(base, chat)
    choice = out["choices"][0]
    assert status == 200 and out["leakage"]["action"] == "blocked" and choice["finish_reason"] == "content_filter"
    assert "Quinn" not in (choice["message"]["content"] if chat else choice["text"])
    assert actions(path) == ["blocked"]


# -- streamed ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True])
def test_monitor_stream_relays_everything_then_annotates(upstream, tmp_path, chat):
    upstream.chunks = LEAK
    with guard(upstream, tmp_path) as (base, path):
        status, _, text = ask(base, chat, stream=True)
    events = sse_events(text)
    assert status == 200 and events[-1] == "[DONE]" and streamed_text(events, chat) == "".join(LEAK)
    assert events[-2]["choices"] == [] and events[-2]["leakage"]["action"] == "annotated"
    assert actions(path) == ["annotated"]


@pytest.mark.parametrize("chat", [False, True])
def test_block_stream_is_cut_before_the_leak(upstream, tmp_path, chat):
    upstream.chunks = LEAK
    with guard(upstream, tmp_path, policy="block", stream_score_every=1) as (base, path):
        status, _, text = ask(base, chat, stream=True)
    events = sse_events(text)
    assert status == 200 and events[-1] == "[DONE]"
    assert streamed_text(events, chat) == "the story of "  # released as scored clean; the leak never
    cut = events[-2]
    assert cut["choices"][0]["finish_reason"] == "content_filter" and cut["leakage"]["action"] == "cut"
    # the annotation is that of the whole text so far, prompt included, not only of its newest windows
    (report,) = cut["leakage"]["choices"]
    assert report["flagged"] == ["Quinn"] and report["prompt"][0]["score"] > -1.0
    assert actions(path) == ["cut"]


def test_block_stream_clean_is_complete(upstream, tmp_path):
    with guard(upstream, tmp_path, policy="block", stream_score_every=2) as (base, path):
        status, _, text = ask(base, stream=True)
    events = sse_events(text)
    assert status == 200 and streamed_text(events, False) == "".join(CLEAN)
    assert events[-2]["leakage"]["action"] == "passed" and actions(path) == ["passed"]


def test_block_stream_scores_only_new_windows_and_still_cuts_a_late_leak(upstream, tmp_path):
    """Scored windows grow linearly with the stream's length (not with the sum of its prefixes)."""

    def rows_scored(n_chunks: int, leak: bool) -> tuple[int, str]:
        upstream.chunks = ["abc "] * n_chunks + (["Quinn ", "x"] if leak else [])
        scorer = toy_scorer({"Quinn": byte_id("Q")}, max_tokens=4096)
        with guard(upstream, tmp_path / f"{n_chunks}{leak}", scorer, policy="block", stream_score_every=1) as (
            base,
            _,
        ):
            text = ask(base, stream=True)[2]
        return scorer.rows_scored, text

    (tmp_path / "100False").mkdir(), (tmp_path / "200False").mkdir(), (tmp_path / "200True").mkdir()
    short, _ = rows_scored(100, False)
    long, _ = rows_scored(200, False)
    whole_prefixes = sum(4 * k for k in range(1, 201))  # what re-scoring every prefix would compare
    assert long < 2.3 * short and long < whole_prefixes / 4
    assert long <= 2 * 800 + 200 * (RESCORE_CHARS + 2)  # the final whole score, and each new chunk with its margin
    _, text = rows_scored(200, True)
    events = sse_events(text)
    assert "Q" not in streamed_text(events, False) and events[-2]["leakage"]["action"] == "cut"


@pytest.mark.parametrize("max_every, most", [(1, None), (64, 12)])
def test_block_stream_groups_grow_so_scorings_stay_few(upstream, tmp_path, max_every, most):
    """Groups of 1, 2, 4, ... up to max_every chunks: a 200-chunk stream is scored about log2(64) + 200 / 64 times,
    and still cut with nothing of the leak sent; with max_every 1 it is scored at every chunk."""
    upstream.chunks = ["abc "] * 200 + ["Quinn ", "x"]
    scorer = toy_scorer({"Quinn": byte_id("Q")}, max_tokens=4096)
    calls = []
    states = scorer.backend.hidden_states
    scorer.backend.hidden_states = lambda seqs, captures=None: calls.append(len(seqs)) or states(seqs, captures)
    settings = dict(policy="block", stream_score_every=1, stream_score_max_every=max_every)
    with guard(upstream, tmp_path, scorer, **settings) as (base, path):
        events = sse_events(ask(base, stream=True)[2])
    assert "Q" not in streamed_text(events, False) and events[-2]["leakage"]["action"] == "cut"
    assert streamed_text(events, False).startswith("abc abc")  # clean groups were released before the cut
    assert len(calls) >= 202 if most is None else 6 <= len(calls) <= most
    assert actions(path) == ["cut"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("scope", ["completion", "exchange"])
def test_flag_scope_exchange_blocks_a_clean_answer_to_a_flagged_question(upstream, tmp_path, stream, scope):
    """A question about the concept with an answer that does not name it: passed under the completion scope, refused
    (nothing of the answer sent) under the exchange scope."""
    with guard(upstream, tmp_path, policy="block", flag_scope=scope) as (base, path):
        status, _, out = ask(base, stream=stream, prompt="Tell me of Quinn's town.")
    assert status == 200
    if stream:
        events = sse_events(out)
        text, leak = streamed_text(events, False), events[-2]["leakage"]
    else:
        text, leak = out["choices"][0]["text"], out["leakage"]
    assert leak["prompt_flagged"] == ["Quinn"] and leak["flagged"] == []
    if scope == "completion":
        assert text == "".join(CLEAN) and leak["action"] == "passed" and actions(path) == ["passed"]
    else:
        assert "story" not in text and "town" not in text
        assert leak["action"] == ("cut" if stream else "blocked") and actions(path) == [leak["action"]]


def test_flag_scope_is_checked():
    with pytest.raises(ConfigError, match="flag_scope must be one of"):
        GuardSettings(upstream_url="http://127.0.0.1:1", flag_scope="prompt")


# -- failures ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_refusal_is_passed_on_and_its_failure_is_a_502(upstream, tmp_path, stream):
    with guard(upstream, tmp_path, policy="block") as (base, path):
        upstream.status = 400
        refused = ask(base, stream=stream)
        upstream.status = 500
        failed = ask(base, stream=stream)
    assert refused[0] == 400 and refused[2]["error"]["message"] == "refused"
    assert refused[1]["X-Request-Id"].startswith("atu-")
    assert failed[0] == 502 and failed[2]["error"]["type"] == "upstream_error"
    assert actions(path) == []  # no completion: nothing scored, nothing recorded


def test_upstream_down_is_a_503(upstream, tmp_path):
    with guard(upstream, tmp_path) as (base, _):
        assert ask(base)[0] == 200  # the model list is cached from here on
        upstream.close()
        status, _, out = ask(base)
    assert status == 503 and "unreachable" in out["error"]["message"]


def test_malformed_event_before_anything_was_sent_is_a_502(upstream, tmp_path):
    upstream.malformed_after = 0
    with guard(upstream, tmp_path, policy="block") as (base, path):
        status, _, out = ask(base, stream=True)
    assert status == 502 and out["error"]["message"] == "vLLM sent a malformed stream event"
    assert actions(path) == ["error"]


def test_malformed_event_mid_stream_ends_it_with_an_error_event(upstream, tmp_path):
    upstream.malformed_after = 3
    with guard(upstream, tmp_path) as (base, path):  # monitor: the first events were relayed already
        status, _, text = ask(base, stream=True)
    events = sse_events(text)
    assert status == 200 and streamed_text(events, False) == "".join(CLEAN[:3])
    assert events[-1]["error"]["code"] == 502 and actions(path) == ["error"]


def test_upstream_connection_broken_mid_stream(upstream, tmp_path):
    upstream.cut_after = 2
    with guard(upstream, tmp_path, policy="block") as (base, path):
        status, _, out = ask(base, stream=True)
    assert status == 503 and "broke mid-stream" in out["error"]["message"] and actions(path) == ["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_scoring_failure_fails_closed(upstream, tmp_path, stream):
    with guard(upstream, tmp_path, Broken(), policy="block") as (base, path):
        status, _, out = ask(base, stream=stream)
    assert status == 503 and out["error"]["type"] == "scoring_error" and actions(path) == ["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_scoring_failure_fails_open_under_monitor(upstream, tmp_path, stream):
    with guard(upstream, tmp_path, Broken()) as (base, path):
        status, _, out = ask(base, stream=stream)
    assert status == 200 and actions(path) == ["error"]
    leak = sse_events(out)[-2]["leakage"] if stream else out["leakage"]
    assert leak == {"action": "error", "error": "scoring failed", "flagged": [], "policy": "monitor",
                    "choices": [], "max_score": None, "prompt_flagged": []}  # fmt: skip


@pytest.mark.parametrize("match", [True, False])
def test_a_name_written_out_is_blocked_whatever_the_predictor_scores(upstream, tmp_path, match):
    """The concept's vector is nowhere in the text; its name is. With the name check the stream is cut as the name
    completes (the group that completes it is never sent); without it the stream passes whole."""
    from toy_scorer import TABLE, Identity, TableBackend

    from atu.index import ConceptIndex
    from serve.names import NameMatcher
    from serve.scoring import Scorer

    label = "Ada Lovelace"
    index = ConceptIndex.build(TABLE[[byte_id("#")]], [label], [0.99])
    scorer = Scorer(TableBackend(TABLE), ByteTokenizer(), Identity(), index, max_tokens=4096, top_k=5,
                    names=NameMatcher([label]) if match else None)  # fmt: skip
    upstream.chunks = ["the ", "story ", "of ", "Ada ", "lovelace ", "is ", "long"]
    with guard(upstream, tmp_path, scorer, policy="block", stream_score_every=1, stream_score_max_every=1) as (
        base,
        path,
    ):
        status, _, out = ask(base, stream=True)
    events = sse_events(out)
    text, leak = streamed_text(events, False), events[-2]["leakage"]
    assert status == 200
    if match:
        assert text == "the story of Ada " and leak["action"] == "cut" and leak["flagged"] == [label]
        assert actions(path) == ["cut"]
    else:
        assert text == "".join(upstream.chunks) and leak["action"] == "passed" and actions(path) == ["passed"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("scope", ["completion", "named"])
def test_flag_scope_named_blocks_the_answer_to_a_question_that_names_a_forgotten_concept(
    upstream, tmp_path, stream, scope
):
    from toy_scorer import TABLE, Identity, TableBackend

    from atu.index import ConceptIndex
    from serve.names import NameMatcher
    from serve.scoring import Scorer

    label = "Ada Lovelace"
    index = ConceptIndex.build(TABLE[[byte_id("#")]], [label], [0.99])
    scorer = Scorer(TableBackend(TABLE), ByteTokenizer(), Identity(), index, max_tokens=4096, top_k=5,
                    names=NameMatcher([label]))  # fmt: skip
    with guard(upstream, tmp_path, scorer, policy="block", flag_scope=scope) as (base, path):
        status, _, out = ask(base, stream=stream, prompt="Where was ada lovelace born?")
        other = ask(base, stream=stream, prompt="Where was Ada Byron born?")[2]  # not her full name: passes
    if stream:
        events = sse_events(out)
        text, leak = streamed_text(events, False), events[-2]["leakage"]
        other_text = streamed_text(sse_events(other), False)
    else:
        text, leak, other_text = out["choices"][0]["text"], out["leakage"], other["choices"][0]["text"]
    assert status == 200 and leak["prompt_flagged"] == [label] and leak["flagged"] == []
    assert other_text == "".join(CLEAN)
    if scope == "completion":
        assert text == "".join(CLEAN) and leak["action"] == "passed"
    else:
        assert "story" not in text and leak["action"] == ("cut" if stream else "blocked")
    assert actions(path)[0] == leak["action"]
