"""Streamed completions through the guard: the streamed path of ``serve.exchange``.

``monitor``: every upstream event is relayed as it arrives; when the upstream ends, the whole completion is scored,
its audit record committed, and one more event carrying the ``leakage`` annotation precedes ``[DONE]``. (With
``on_scoring_error="closed"`` a monitored stream is held back and scored like a blocked one, so that nothing
unscored reaches the client, but it is never cut.)

``block``: no text reaches the client unscored. Events are held back and the text added since the last score is
scored when a group of content events is complete: the first group is ``stream_score_every`` events, each next one
twice the last, up to ``stream_score_max_every`` (only the new windows are scored: the predictor is causal, so the
windows scored before keep their scores; see ``Scorer.score_batch``'s ``since``), and the whole completion at the
end. Each scoring has a fixed cost beside its arithmetic, so growing groups keep a short stream's scorings few while
its first bytes still wait for the first group only. A
clean score releases what was held; a flagged one drops it and ends the stream with a ``content_filter`` event
that carries the annotation of the whole text so far. Nothing is sent before the first clean score, so when the
upstream or the scorer fails early the client still gets a proper 503/504.
"""

from __future__ import annotations

import contextlib
import time

import aiohttp
from aiohttp import web

from serve import policy as pol
from serve.exchange import Exchange
from serve.responses import CLIENT_REQUEST_ID, UpstreamError, error_body
from serve.scoring import Capture, Resume
from serve.upstream import DONE
from serve.validate import ParsedRequest


class StreamState:
    """The events and text of one stream, per choice."""

    def __init__(self, req: ParsedRequest, capture_key: str | None = None, key: str = "") -> None:
        self.req = req
        self.key = key  # names the stream's cached predictor work in the scorer (``Resume``)
        self.capture_key = capture_key  # the request was marked for the capture plugin and asked for token ids
        self.keep_ids = bool(req.body.get("return_token_ids"))  # the client asked for them too
        self.prompt_ids: dict[int, list[int]] = {}
        self.completion_ids: dict[int, list[int]] = {}
        self.texts: dict[int, str] = {}
        self.scored: dict[int, int] = {}  # characters of each choice's text a clean score covered; {} before the first
        self.template: dict | None = None  # the first event: id, created, model for the events we add
        self.held: list[bytes] = []
        self.unscored = 0  # content events held since the last score

    def add(self, data: dict) -> tuple[bool, bool]:
        """Record one upstream event: (it carried text, it was changed: token ids the client did not ask for were
        taken out)."""
        changed = False
        if self.capture_key is not None:
            ids, changed = pol.take_token_ids(data, self.keep_ids)
            for i, (prompt, completion) in ids.items():
                if prompt is not None:
                    self.prompt_ids[i] = list(prompt)
                if completion:
                    self.completion_ids.setdefault(i, []).extend(completion)
        if self.template is None:
            self.template = data
        got = False
        for c in data.get("choices") or []:
            text = pol.delta_text(c, self.req.chat)
            if text:
                i = int(c.get("index", 0))
                self.texts[i] = self.texts.get(i, "") + text
                got = True
        return got, changed

    def pairs(self) -> list[tuple[str, str]]:
        n_choices = max(len(self.req.prompts) * self.req.n, max(self.texts, default=-1) + 1)
        prompts = [self.req.prompts[min(i // self.req.n, len(self.req.prompts) - 1)] for i in range(n_choices)]
        return [(prompts[i], self.texts.get(i, "")) for i in range(n_choices)]

    def since(self, final: bool = False) -> list[Resume]:
        """Per choice, how much of its text a clean score covered (the scorer scores only what follows; None before
        the first score, which takes the prompt too; ``final``: all of it, the stream's last scoring), and where the
        scorer keeps the predictor's work on it."""
        n = len(self.pairs())
        if final:
            return [Resume(f"{self.key}/{i}", None, final=True) for i in range(n)]
        return [Resume(f"{self.key}/{i}", self.scored.get(i)) for i in range(n)]

    def mark_scored(self) -> None:
        self.scored = {i: len(text) for i, (_, text) in enumerate(self.pairs())}

    def captures(self, final: bool) -> list | None:
        """Per choice, what the capture backend needs (``final``: the plugin may then forget the states)."""
        if self.capture_key is None:
            return None
        n = len(self.pairs())
        return [
            Capture(self.capture_key, final, self.prompt_ids.get(i), self.completion_ids.get(i, []))
            if i in self.prompt_ids
            else Capture(self.capture_key, final)
            for i in range(n)
        ]


class ClientGone(Exception):
    """The client closed its connection mid-stream."""


async def relay(ex: Exchange, raw: bytes) -> web.StreamResponse:
    """A streamed exchange: forward, relay or hold and score, end with the annotation, record how it ended."""
    stream = Relay(ex)
    try:
        return await _relay(stream, raw)
    finally:  # a stream that did not end with its final scoring leaves states in vLLM's capture plugin: free them
        if ex.capture_key is not None and not stream.released:
            await ex.guard.release_capture(ex.capture_key)


async def _relay(stream: Relay, raw: bytes) -> web.StreamResponse:
    ex, upstream = stream.ex, stream.ex.guard.upstream
    resp = await upstream.open("POST", ex.request.path, raw, stream=True)
    async with resp:  # leaving it closes the upstream connection: vLLM aborts the request
        if resp.status != 200:
            body = await upstream.read(resp)
            if resp.status >= 500:
                raise upstream.failed(resp.status)
            return ex.refused(resp.status, body)
        try:
            return await stream.run(resp)
        except ClientGone:
            await stream.record(pol.ERROR, "the client disconnected mid-stream")
            return stream.out
        except UpstreamError as e:
            await stream.record(pol.ERROR, str(e))
            if not stream.out.prepared:
                raise  # answered as every upstream failure is (serve.middleware)
            with contextlib.suppress(ClientGone):  # too late for a status: the stream ends with an error event
                await stream.send(pol.sse(error_body(e.status, str(e), "upstream_error")))
            return stream.out


class Relay:
    """One stream through the guard: holds, scores, releases or cuts."""

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.state = StreamState(ex.req, ex.capture_key, ex.request_id)
        self.out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Request-Id": ex.request_id})  # fmt: skip
        self.released = False  # the final scoring read (and released) the captured states
        settings = ex.guard.settings
        self.group = settings.stream_score_every  # content events held before the next scoring
        self.max_group = max(settings.stream_score_every, settings.stream_score_max_every)

    async def send(self, data: bytes) -> None:
        ex = self.ex
        if not self.out.prepared and not ex.recorded:  # durable before the first byte: a crash leaves a record
            await ex.guard.open_stream(ex.request_id, ex.request.path, ex.req.model, ex.request[CLIENT_REQUEST_ID])
        try:
            if not self.out.prepared:
                await self.out.prepare(ex.request)
            await self.out.write(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            raise ClientGone() from None

    async def score(self, final: bool = False) -> list:
        """Reports of the whole text so far (the plugin may forget the captured states only once it is final)."""
        since = self.state.since(final=True) if final and self.ex.hold else None  # a held stream was scored before
        reports = await self.ex.score(self.state.pairs(), self.state.captures(final), since)
        self.released = final
        return reports

    async def record(self, action: str, error: str | None = None) -> None:
        await self.ex.record(action, self.state.pairs(), [], error)

    async def finish(self, action: str, reports: list, error: str | None = None) -> web.StreamResponse:
        _, shown = await self.ex.conclude(action, self.state.pairs(), reports, error)
        if action == pol.CUT:
            event = pol.cut_event(self.state.template, len(self.state.pairs()), self.ex.req.chat, shown)
        else:
            event = pol.annotation_event(self.state.template, self.ex.req.chat, shown)
        await self.send(pol.sse(event))
        await self.send(pol.sse(DONE))
        return self.out

    async def run(self, resp) -> web.StreamResponse:
        state, ex = self.state, self.ex
        async for batch in ex.guard.upstream.events(resp):
            transport = ex.request.transport
            if transport is None or transport.is_closing():  # gone while its events were held back: stop now
                raise ClientGone()
            released, done = [], False
            for event, data in batch:
                if data == DONE:
                    done = True
                    break
                got_text, changed = state.add(data)
                event = pol.sse(data) if changed else event
                if not ex.hold:
                    released.append(event)
                    continue
                state.held.append(event)
                state.unscored += got_text
                if state.unscored >= self.group:
                    outcome = await self._score_held(released)
                    if outcome is not None:
                        return outcome
            if released:
                await self.send(b"".join(released))
            if done:
                break
        ex.guard.metrics.upstream_seconds.observe(time.perf_counter() - ex.started)
        return await self._end()

    async def _score_held(self, released: list) -> web.StreamResponse | None:
        """Score the text added since the last score: release what is held when clean (into ``released``), else
        end the stream."""
        state = self.state
        try:
            reports = await self.ex.score(state.pairs(), state.captures(False), state.since())
        except Exception as e:  # failing closed: what is held back is dropped
            if released:  # scored clean earlier in this read
                await self.send(b"".join(released))
            return await self._fail(e)
        state.unscored = 0
        if self.ex.block and self.ex.flagged(reports):
            state.held.clear()
            if released:
                await self.send(b"".join(released))
            return await self.finish(pol.CUT, await self._cut_reports(reports))
        state.mark_scored()
        self.group = min(2 * self.group, self.max_group)
        released += state.held
        state.held.clear()
        return None

    async def _cut_reports(self, new: list) -> list:
        """The reports of the whole text so far, for the annotation of a cut stream; those of its new windows when
        scoring it whole fails (the cut stands either way)."""
        try:
            return await self.score()
        except Exception as e:
            self.ex.scoring_failed(e)
            return new

    async def _end(self) -> web.StreamResponse:
        state = self.state
        try:
            reports = await self.score(final=True)
        except Exception as e:
            return await self._fail(e)
        flagged = self.ex.flagged(reports)
        if self.ex.block and flagged:
            state.held.clear()
        if state.held:
            await self.send(b"".join(state.held))
        return await self.finish(pol.decide(self.ex.policy, flagged, stream=True), reports)

    async def _fail(self, exc: Exception) -> web.StreamResponse:
        """Scoring failed. Failing open, the stream ends with an error annotation; failing closed, what is held is
        dropped, and when nothing was sent yet the answer is a 503."""
        error = self.ex.scoring_failed(exc)
        if self.ex.hold:
            self.state.held.clear()
            if not self.out.prepared:
                return await self.ex.fail_closed(self.state.pairs(), error)
        return await self.finish(pol.ERROR, [], error=error)
