"""The guard's pure parts: request validation, policies, settings, the scoring micro-batcher."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

import pytest

from atu.errors import ConfigError
from serve import policy as pol
from serve.batcher import ScoreBatcher, ScoringOverloaded, ScoringTimeout
from serve.settings import GuardSettings
from serve.validate import BadRequest, parse_chat, parse_completion, parse_json, parse_leakage


class _Tok:
    """Just enough tokenizer for validation: decode ids and render a chat template."""

    chat_template = "yes"

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


@dataclass
class _Report:
    flagged: list = field(default_factory=list)
    prompt_flagged: list = field(default_factory=list)
    max_score: float = 0.1

    def to_dict(self):
        return {"flagged": self.flagged, "max_score": self.max_score}


# -- validation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, match",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_parse_json_rejects(raw, match):
    with pytest.raises(BadRequest, match=match):
        parse_json(raw)


@pytest.mark.parametrize(
    "body, match",
    [
        ({"prompt": "hi"}, "'model' is required"),
        ({"model": 3, "prompt": "hi"}, "'model' must be a model name"),
        ({"model": "m"}, "'prompt' is required"),
        ({"model": "m", "prompt": 5}, "'prompt' is required"),
        ({"model": "m", "prompt": [1, "a"]}, "mixes token ids"),
        ({"model": "m", "prompt": "hi", "max_tokens": "8"}, "'max_tokens' must be a positive integer, got str"),
        ({"model": "m", "prompt": "hi", "max_tokens": 0}, "'max_tokens' must be >= 1"),
        ({"model": "m", "prompt": "hi", "stream": "yes"}, "'stream' must be true or false"),
        ({"model": "m", "prompt": "hi", "n": True}, "'n' must be a positive integer, got a boolean"),
        ({"model": "m", "prompt": "hi", "temperature": "hot"}, "'temperature' must be a number"),
    ],
)
def test_parse_completion_rejects(body, match):
    with pytest.raises(BadRequest, match=match):
        parse_completion(body, _Tok())


def test_parse_completion_prompt_forms():
    tok = _Tok()
    assert parse_completion({"model": "m", "prompt": "hi"}, tok).prompts == ["hi"]
    assert parse_completion({"model": "m", "prompt": ["a", "b"], "n": 2}, tok).prompts == ["a", "b"]
    assert parse_completion({"model": "m", "prompt": [1, 2]}, tok).prompts == ["t1 t2"]
    req = parse_completion({"model": "m", "prompt": [[1], [2, 3]], "stream": True}, tok)
    assert req.prompts == ["t1", "t2 t3"] and req.stream and not req.chat and req.n == 1


def test_parse_chat():
    req = parse_chat({"model": "m", "messages": [{"role": "user", "content": "Who?"}]}, _Tok())
    assert req.prompts == ["<user>Who?<assistant>"] and req.chat
    with pytest.raises(BadRequest, match="'messages' is required"):
        parse_chat({"model": "m", "messages": []}, _Tok())
    with pytest.raises(BadRequest, match=r"messages\[0\].content must be a string"):
        parse_chat({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, _Tok())


def test_parse_leakage():
    assert parse_leakage({"text": "abc"}) == ("", "abc")
    assert parse_leakage({"prompt": "p", "completion": "c"}) == ("p", "c")
    with pytest.raises(BadRequest, match="'completion' is required"):
        parse_leakage({"prompt": "p"})
    with pytest.raises(BadRequest, match="'text' must be a string"):
        parse_leakage({"text": 1})


# -- policy -------------------------------------------------------------------------------------------------------
def test_decide():
    assert pol.decide("monitor", False) == pol.PASSED
    assert pol.decide("block", False, stream=True) == pol.PASSED
    assert pol.decide("monitor", True) == pol.ANNOTATED
    assert pol.decide("block", True) == pol.BLOCKED
    assert pol.decide("block", True, stream=True) == pol.CUT


def test_block_choices_rebuilds_flagged_choices_from_an_allow_list():
    secret = {"index": 0, "text": "secret", "finish_reason": "length", "logprobs": {"tokens": ["secret"]},
              "token_ids": [7, 8], "prompt_token_ids": [1], "stop_reason": "secret"}  # fmt: skip
    body = {"choices": [secret, {"index": 1, "text": "fine", "token_ids": [3]}]}
    out, blocked = pol.block_choices(body, [_Report(flagged=["X"]), _Report()], "no.", chat=False)
    assert out["choices"][0] == {"index": 0, "text": "no.", "logprobs": None, "finish_reason": "content_filter"}
    assert out["choices"][1] == {"index": 1, "text": "fine", "token_ids": [3]} and blocked == [True, False]
    assert body["choices"][0]["text"] == "secret"  # the caller's body is untouched
    message = {"role": "assistant", "content": "secret", "reasoning_content": "secret",
               "tool_calls": [{"function": {"name": "f", "arguments": '{"a": "secret"}'}}]}  # fmt: skip
    chat = {"choices": [{"index": 0, "message": message, "logprobs": {"content": [{"token": "secret"}]}}]}
    out, _ = pol.block_choices(chat, [_Report(flagged=["X"])], "no.", chat=True)
    assert out["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "no."}, "logprobs": None,
                                 "finish_reason": "content_filter"}  # fmt: skip
    assert "secret" not in json.dumps(out)


def test_every_generated_text_field_is_scored():
    message = {"role": "assistant", "content": "a", "reasoning_content": "r",
               "tool_calls": [{"id": "x", "function": {"name": "lookup", "arguments": '{"q": "1984"}'}}]}  # fmt: skip
    assert pol.choice_text({"message": message}, chat=True) == 'ralookup{"q": "1984"}'
    delta = {"tool_calls": [{"index": 0, "function": {"arguments": '"19'}}]}
    assert pol.delta_text({"delta": delta}, chat=True) == '"19'
    assert pol.choice_text({"message": {"content": None, "function_call": {"arguments": "x"}}}, chat=True) == "x"


def test_leakage_object():
    leak = pol.leakage_object("monitor", pol.ANNOTATED, [_Report(["B", "A"], ["C"], 0.7), _Report(max_score=0.2)])
    assert leak["flagged"] == ["A", "B"] and leak["prompt_flagged"] == ["C"] and leak["max_score"] == 0.7
    assert len(leak["choices"]) == 2


def test_stream_events():
    tmpl = {"id": "cmpl-1", "created": 5, "model": "m", "choices": [{"index": 0, "text": "a"}]}
    cut = pol.cut_event(tmpl, 2, chat=True, leakage={"x": 1})
    assert [c["finish_reason"] for c in cut["choices"]] == ["content_filter"] * 2
    assert cut["id"] == "cmpl-1" and cut["leakage"] == {"x": 1} and cut["choices"][0]["delta"] == {}
    ann = pol.annotation_event(tmpl, chat=False, leakage={"x": 1})
    assert ann["choices"] == [] and ann["object"] == "text_completion"
    assert pol.sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(pol.sse({"a": 1})[6:]) == {"a": 1}
    assert pol.delta_text({"delta": {"content": "x"}}, chat=True) == "x"
    assert pol.delta_text({"delta": {"role": "assistant"}}, chat=True) == ""


# -- settings -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"upstream_url": "localhost:8000"}, "upstream_url must be an http"),
        ({"policy": "shout"}, "policy must be one of"),
        ({"on_scoring_error": "maybe"}, "on_scoring_error must be one of"),
        ({"max_body_bytes": 0}, "max_body_bytes must be a positive int"),
        ({"upstream_timeout": -1}, "upstream_timeout must be a positive number"),
        ({"api_key": "  "}, "api_key must be a non-empty string"),
    ],
)
def test_settings_reject(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GuardSettings(**{"upstream_url": "http://127.0.0.1:1", **kwargs})


def test_settings_fail_open_and_public_dict():
    s = GuardSettings("http://h:1/", api_key="sekrit")
    assert s.upstream_url == "http://h:1" and s.fail_open
    assert GuardSettings("http://h:1", policy="block").fail_open is False  # block always fails closed
    assert GuardSettings("http://h:1", on_scoring_error="closed").fail_open is False
    assert "sekrit" not in json.dumps(s.public_dict())


# -- batcher ------------------------------------------------------------------------------------------------------
def test_batcher_batches_concurrent_requests_and_keeps_order():
    sizes = []
    gate = threading.Event()

    def score_batch(pairs, captures, since):
        gate.wait(5)  # hold the first batch so that the others queue up behind it
        sizes.append(len(pairs))
        return [f"{p}|{c}|{cap}" for (p, c), cap in zip(pairs, captures)]

    async def main():
        b = ScoreBatcher(score_batch, max_batch=8)
        await b.start()
        caps = [(f"k{i}", i % 2 == 0) if i % 3 else None for i in range(20)]
        tasks = [asyncio.create_task(b.score(f"p{i}", f"c{i}", caps[i])) for i in range(20)]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(*tasks)
        await b.stop()
        return out, caps

    out, caps = asyncio.run(main())
    assert out == [f"p{i}|c{i}|{caps[i]}" for i in range(20)]
    assert sum(sizes) == 20 and max(sizes) == 8 and len(sizes) < 20


def test_batcher_propagates_errors_to_the_batch_only():
    def score_batch(pairs, captures, since):
        if any(c == "bad" for _, c in pairs):
            raise RuntimeError("boom")
        return [c for _, c in pairs]

    async def main():
        b = ScoreBatcher(score_batch, max_batch=1)
        await b.start()
        bad = await asyncio.gather(b.score("p", "bad"), return_exceptions=True)
        good = await b.score("p", "ok")
        await b.stop()
        return bad[0], good

    bad, good = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and "boom" in str(bad) and good == "ok"


def test_batcher_retries_a_failed_batch_one_by_one():
    calls = []

    def score_batch(pairs, captures, since):
        calls.append(len(pairs))
        if any(c == "bad" for _, c in pairs):
            raise ValueError("bad item")
        return [c for _, c in pairs]

    async def main():
        b = ScoreBatcher(score_batch, max_batch=8)
        await b.start()
        out = await asyncio.gather(*(b.score("p", c) for c in ["a", "bad", "c"]), return_exceptions=True)
        await b.stop()
        return out

    a, bad, c = asyncio.run(main())
    assert (a, c) == ("a", "c") and isinstance(bad, ValueError)  # neighbours of the bad item are scored
    assert calls[0] == 3 and calls[1:] == [1, 1, 1]


def test_batcher_deadline_and_bounded_queue():
    release = threading.Event()

    def hanging(pairs, captures, since):
        release.wait(10)
        return [c for _, c in pairs]

    async def main():
        b = ScoreBatcher(hanging, max_batch=1, max_queue=2, timeout=0.2)
        await b.start()
        first = asyncio.create_task(b.score("p", "1"))  # taken by the worker, which then hangs
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(b.score("p", str(i))) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ScoringOverloaded, match="2 exchanges already wait"):
            await b.score("p", "x")
        out = await asyncio.gather(first, *waiting, return_exceptions=True)
        release.set()
        await b.stop()
        return out

    out = asyncio.run(main())
    assert all(isinstance(e, ScoringTimeout) and "0.2s" in str(e) for e in out)


def test_guard_sends_its_upstream_key_and_never_the_clients():
    """vLLM started by `atu serve` answers only the per-run key; the guard sends it, not the client's key."""
    import urllib.request

    from aiohttp import web

    from serve.app import Guard
    from serve.launch import guard_in_thread

    seen = []

    async def models(request):
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start():
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner.addresses[0][1]

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    settings = GuardSettings(f"http://127.0.0.1:{port}", port=0, api_key="client-key", upstream_key="run-key")
    scorer = type("S", (), {"score_batch": lambda self, pairs, captures=None, since=None: []})()
    try:
        with guard_in_thread(Guard(settings, scorer, _Tok())) as base:
            req = urllib.request.Request(base + "/v1/models", headers={"Authorization": "Bearer client-key"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert json.loads(resp.read())["data"][0]["id"] == "m"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
    assert seen == ["Bearer run-key"]
    assert "run-key" not in json.dumps(settings.public_dict())


def test_upstream_sends_again_once_when_the_server_closes_before_answering():
    """A connection closed before any answer (a keep-alive connection the server was closing) is retried once on a
    fresh one; a server that always does so is a 503."""
    from serve.metrics import GuardMetrics
    from serve.responses import UpstreamError
    from serve.upstream import Upstream

    async def main(closes: int):
        seen = []

        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            seen.append(1)
            if len(seen) <= closes:  # read the request, answer nothing, hang up
                writer.close()
                return
            body = b'{"ok": true}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))  # fmt: skip
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        up = Upstream(GuardSettings(f"http://127.0.0.1:{port}", port=0), GuardMetrics())
        await up.start()
        try:
            return await up.call("POST", "/v1/completions", b"{}"), len(seen)  # aiohttp itself retries only a GET
        except UpstreamError as e:
            return e, len(seen)
        finally:
            await up.close()
            server.close()

    (status, raw), tries = asyncio.run(main(closes=1))
    assert status == 200 and raw == b'{"ok": true}' and tries == 2
    err, tries = asyncio.run(main(closes=5))
    assert isinstance(err, UpstreamError) and err.status == 503 and tries == 2
