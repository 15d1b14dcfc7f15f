"""Streamed completions through the guard.

``monitor``: every upstream event is relayed as it arrives; when the upstream ends, the whole completion is scored,
its audit record committed, and one more event carrying the ``leakage`` annotation precedes ``[DONE]``. (With
``on_scoring_error="closed"`` a monitored stream is held back and scored like a blocked one, so that nothing
unscored reaches the client, but it is never cut.)

``block``: no text reaches the client unscored. Events are held back and the completion so far is scored every
``stream_score_every`` content events (and at the end); a clean score releases what was held, a flagged one drops
it and ends the stream with a ``content_filter`` event that carries the annotation. Nothing is sent before the first
clean score, so when the upstream or the scorer fails early the client still gets a proper 503/504.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from serve import policy as pol
from serve.disclose import client_leakage
from serve.responses import CLIENT_REQUEST_ID, REQUEST_ID, UpstreamError, error_response
from serve.scoring import Capture

if TYPE_CHECKING:
    from serve.app import Guard
    from serve.validate import ParsedRequest

logger = logging.getLogger(__name__)


class _StreamState:
    """The events and text of one stream, per choice."""

    def __init__(self, req: ParsedRequest, capture_key: str | None = None) -> None:
        self.req = req
        self.capture_key = capture_key  # the request was marked for the capture plugin and asked for token ids
        self.keep_ids = bool(req.body.get("return_token_ids"))  # the client asked for them too
        self.prompt_ids: dict[int, list[int]] = {}
        self.completion_ids: dict[int, list[int]] = {}
        self.texts: dict[int, str] = {}
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


async def _events(resp, guard: Guard):
    """Yield, per upstream read, the list of (raw event bytes, parsed JSON object or the literal "[DONE]") it
    completed.

    Events that arrive together are handled together, so the relay writes once per read, not once per event."""
    buf = b""
    try:
        async for chunk in resp.content.iter_any():
            buf += chunk
            *complete, buf = buf.split(b"\n\n")
            batch = [(event + b"\n\n", _parse_event(event, guard)) for event in complete]
            batch = [(event, data) for event, data in batch if data is not None]
            if batch:
                yield batch
    except TimeoutError:
        guard.metrics.upstream_errors.labels("timeout").inc()
        raise UpstreamError(
            504, f"vLLM stalled for more than {guard.settings.upstream_timeout:g}s mid-stream"
        ) from None
    except (aiohttp.ClientError, OSError) as e:  # a broken connection
        guard.metrics.upstream_errors.labels("broken").inc()
        raise UpstreamError(503, f"the connection to vLLM broke mid-stream ({type(e).__name__})") from None


def _parse_event(event: bytes, guard: Guard) -> dict | str | None:
    """An event's JSON object, "[DONE]", or None for comments and keep-alives; anything else is vLLM's fault."""
    line = event.strip()
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return "[DONE]"
    try:
        data = json.loads(payload)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("choices", []), list):
        guard.metrics.upstream_errors.labels("bad_answer").inc()
        raise UpstreamError(502, "vLLM sent a malformed stream event")
    return data


class _ClientGone(Exception):
    """The client closed its connection mid-stream."""


async def relay_stream(
    request: web.Request, req: ParsedRequest, guard: Guard, raw: bytes, capture_key: str | None = None
) -> web.StreamResponse:
    relay = _Relay(request, req, guard, capture_key)
    try:
        return await _relay(relay, guard, raw)
    finally:  # a stream that did not end with its final scoring leaves states in vLLM's capture plugin: free them
        if capture_key is not None and not relay.released:
            await guard.release_capture(capture_key)


async def _relay(relay: _Relay, guard: Guard, raw: bytes) -> web.StreamResponse:
    resp = await guard.upstream("POST", relay.request.path, raw, stream=True)
    async with resp:  # leaving it closes the upstream connection: vLLM aborts the request
        if resp.status != 200:
            body = await guard.read_upstream(resp)
            if resp.status >= 500:
                raise UpstreamError(502, f"vLLM failed with status {resp.status}")
            return web.Response(body=body, status=resp.status, content_type="application/json",
                                headers={"X-Request-Id": relay.request_id})  # fmt: skip
        try:
            return await relay.run(resp)
        except _ClientGone:
            await relay.close_record(pol.ERROR, "the client disconnected mid-stream")
            return relay.out
        except UpstreamError as e:
            await relay.close_record(pol.ERROR, str(e))
            if not relay.out.prepared:
                return error_response(e.status, str(e), "upstream_error", relay.request_id)
            error = {"error": {"message": str(e), "type": "upstream_error", "code": e.status}}
            with contextlib.suppress(_ClientGone):
                await relay.send(pol.sse(error))
            return relay.out


class _Relay:
    """One stream through the guard: holds, scores, releases or cuts, and records how it ended."""

    def __init__(self, request: web.Request, req: ParsedRequest, guard: Guard, capture_key: str | None) -> None:
        self.request, self.req, self.guard = request, req, guard
        self.request_id = request[REQUEST_ID]
        s = guard.settings
        self.block = s.policy == "block"
        self.hold = not s.fail_open  # block, or monitor failing closed: nothing unscored may reach the client
        self.state = _StreamState(req, capture_key)
        self.out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Request-Id": self.request_id})  # fmt: skip
        self.started = time.perf_counter()
        self.scoring_s = 0.0
        self.recorded = False
        self.released = False  # the final scoring read (and released) the captured states

    async def send(self, data: bytes) -> None:
        if not self.out.prepared and not self.recorded:  # durable before the first byte: a crash leaves a record
            await self.guard.open_stream(self.request_id, self.request.path, self.req.model,
                                         self.request[CLIENT_REQUEST_ID])  # fmt: skip
        try:
            if not self.out.prepared:
                await self.out.prepare(self.request)
            await self.out.write(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            raise _ClientGone() from None

    async def score(self, final: bool = False) -> list:
        t = time.perf_counter()
        try:  # the plugin may forget the captured states only once the whole completion is scored
            reports = await self.guard.score_all(self.state.pairs(), self.state.captures(final))
            self.released = final
            return reports
        finally:
            self.scoring_s += time.perf_counter() - t

    async def close_record(self, action: str, error: str | None = None, reports: list | None = None) -> None:
        """The stream's audit record, written once whatever way it ended."""
        if self.recorded:
            return
        self.recorded = True
        pairs = self.state.pairs()
        await self.guard.record(
            request_id=self.request_id, client_request_id=self.request[CLIENT_REQUEST_ID], endpoint=self.request.path,
            model=self.req.model, action=action, stream=True, reports=reports or [], prompts=[p for p, _ in pairs],
            completions=[c for _, c in pairs], upstream_ms=1000 * (time.perf_counter() - self.started),
            scoring_ms=1000 * self.scoring_s, error=error,
        )  # fmt: skip

    async def finish(self, action: str, reports: list, error: str | None = None) -> web.StreamResponse:
        leak = pol.leakage_object(self.guard.settings.policy, action, reports, error=error)
        await self.close_record(action, error, reports)
        self.guard.count(leak)
        shown = client_leakage(leak, self.guard.settings.disclose)
        n = len(self.state.pairs())
        if action == pol.CUT:
            await self.send(pol.sse(pol.cut_event(self.state.template, n, self.req.chat, shown)))
        else:
            await self.send(pol.sse(pol.annotation_event(self.state.template, self.req.chat, shown)))
        await self.send(pol.sse("[DONE]"))
        return self.out

    async def run(self, resp) -> web.StreamResponse:
        state = self.state
        async for batch in _events(resp, self.guard):
            transport = self.request.transport
            if transport is None or transport.is_closing():  # gone while its events were held back: stop now
                raise _ClientGone()
            released, done = [], False
            for event, data in batch:
                if data == "[DONE]":
                    done = True
                    break
                got_text, changed = state.add(data)
                event = pol.sse(data) if changed else event
                if not self.hold:
                    released.append(event)
                    continue
                state.held.append(event)
                state.unscored += got_text
                if state.unscored >= self.guard.settings.stream_score_every:
                    outcome = await self._score_held(released)
                    if outcome is not None:
                        return outcome
            if released:
                await self.send(b"".join(released))
            if done:
                break
        self.guard.metrics.upstream_seconds.observe(time.perf_counter() - self.started)
        return await self._end()

    async def _score_held(self, released: list) -> web.StreamResponse | None:
        """Score what is held: release it when clean (into ``released``), else end the stream."""
        try:
            reports = await self.score()
        except Exception as e:  # failing closed: what is held back is dropped
            if released:  # scored clean earlier in this read
                await self.send(b"".join(released))
            return await self._fail_closed(e)
        self.state.unscored = 0
        if self.block and any(r.flagged for r in reports):
            self.state.held.clear()
            if released:
                await self.send(b"".join(released))
            return await self.finish(pol.CUT, reports)
        released += self.state.held
        self.state.held.clear()
        return None

    async def _end(self) -> web.StreamResponse:
        state = self.state
        try:
            reports = await self.score(final=True)
        except Exception as e:
            if self.hold:
                return await self._fail_closed(e)
            self.guard.metrics.scoring_errors.inc()
            return await self.finish(pol.ERROR, [], error=f"scoring failed: {e}")
        flagged = any(r.flagged for r in reports)
        if self.block and flagged:
            state.held.clear()
        if state.held:
            await self.send(b"".join(state.held))
        return await self.finish(pol.decide(self.guard.settings.policy, flagged, stream=True), reports)

    async def _fail_closed(self, exc: Exception) -> web.StreamResponse:
        """Scoring failed where nothing unscored may pass: drop what is held; 503 if nothing was sent yet."""
        self.guard.metrics.scoring_errors.inc()
        logger.warning("request %s: scoring failed mid-stream: %s", self.request_id, exc)
        self.state.held.clear()
        error = f"scoring failed: {exc}"
        if self.out.prepared:
            return await self.finish(pol.ERROR, [], error=error)
        await self.close_record(pol.ERROR, error)
        return error_response(
            503, "scoring failed; the policy fails closed: nothing unscored is returned", "scoring_error",
            self.request_id,
        )  # fmt: skip
