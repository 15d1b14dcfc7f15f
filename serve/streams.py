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

import json
import time
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from serve import policy as pol
from serve.responses import REQUEST_ID, UpstreamError, error_response
from serve.scoring import Capture

if TYPE_CHECKING:
    from serve.app import Guard
    from serve.validate import ParsedRequest


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
    """Yield, per upstream read, the list of (raw event bytes, parsed JSON or the literal "[DONE]") it completed.

    Events that arrive together are handled together, so the relay writes once per read, not once per event."""
    buf = b""
    try:
        async for chunk in resp.content.iter_any():
            buf += chunk
            *complete, buf = buf.split(b"\n\n")
            batch = []
            for event in complete:
                line = event.strip()
                if not line.startswith(b"data:"):
                    continue  # comments and keep-alives
                payload = line[5:].strip()
                batch.append((event + b"\n\n", "[DONE]" if payload == b"[DONE]" else json.loads(payload)))
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


async def relay_stream(
    request: web.Request, req: ParsedRequest, guard: Guard, raw: bytes, capture_key: str | None = None
) -> web.StreamResponse:
    request_id = request[REQUEST_ID]
    settings = guard.settings
    block = settings.policy == "block"
    hold = not settings.fail_open  # block, or monitor set to fail closed: nothing unscored may reach the client
    state = _StreamState(req, capture_key)
    out = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": request_id}
    )
    started = time.perf_counter()
    scoring_s = 0.0

    async def send(data: bytes) -> None:
        if not out.prepared:
            await out.prepare(request)
        await out.write(data)

    async def score(final: bool = False) -> list:
        nonlocal scoring_s
        t = time.perf_counter()
        try:  # the plugin may forget the captured states only once the whole completion is scored
            return await guard.score_all(state.pairs(), state.captures(final))
        finally:
            scoring_s += time.perf_counter() - t

    async def finish(action: str, reports: list, error: str | None = None) -> None:
        leak = pol.leakage_object(settings.policy, action, reports, error=error)
        pairs = state.pairs()
        await guard.record(
            request_id=request_id,
            endpoint=request.path,
            model=req.model,
            action=action,
            stream=True,
            reports=reports,
            prompts=[p for p, _ in pairs],
            completions=[c for _, c in pairs],
            upstream_ms=1000 * (time.perf_counter() - started),
            scoring_ms=1000 * scoring_s,
            error=error,
        )
        guard.count(leak)
        if action == pol.CUT:
            await send(pol.sse(pol.cut_event(state.template, len(pairs), req.chat, leak)))
        else:
            await send(pol.sse(pol.annotation_event(state.template, req.chat, leak)))
        await send(pol.sse("[DONE]"))

    resp = await guard.upstream("POST", request.path, raw, stream=True)
    async with resp:
        if resp.status != 200:
            return web.Response(
                body=await guard.read_upstream(resp),
                status=resp.status,
                content_type="application/json",
                headers={"X-Request-Id": request_id},
            )
        try:
            async for batch in _events(resp, guard):
                done = False
                relay = []
                for event, data in batch:
                    if data == "[DONE]":
                        done = True
                        break
                    got_text, changed = state.add(data)
                    if changed:
                        event = pol.sse(data)
                    if not hold:
                        relay.append(event)
                        continue
                    state.held.append(event)
                    state.unscored += got_text
                    if state.unscored >= settings.stream_score_every:
                        try:
                            reports = await score()
                        except Exception as e:  # failing closed: what is held back is dropped
                            if relay:  # scored clean earlier in this read
                                await send(b"".join(relay))
                            return await _fail_closed(request, guard, req, state, out, finish, e)
                        state.unscored = 0
                        if block and any(r.flagged for r in reports):
                            state.held.clear()
                            if relay:
                                await send(b"".join(relay))
                            await finish(pol.CUT, reports)
                            return out
                        relay += state.held
                        state.held.clear()
                if relay:
                    await send(b"".join(relay))
                if done:
                    break
        except UpstreamError as e:
            if not out.prepared:
                return error_response(e.status, str(e), "upstream_error", request_id)
            await send(pol.sse({"error": {"message": str(e), "type": "upstream_error", "code": e.status}}))
            return out
        guard.metrics.upstream_seconds.observe(time.perf_counter() - started)

    try:
        reports = await score(final=True)
    except Exception as e:
        if not settings.fail_open:
            return await _fail_closed(request, guard, req, state, out, finish, e)
        guard.metrics.scoring_errors.inc()
        for e_ in state.held:
            await send(e_)
        await finish(pol.ERROR, [], error=f"scoring failed: {e}")
        return out
    flagged = any(r.flagged for r in reports)
    if block and flagged:
        state.held.clear()
    for e_ in state.held:
        await send(e_)
    await finish(pol.decide(settings.policy, flagged, stream=True), reports)
    return out


async def _fail_closed(request, guard: Guard, req: ParsedRequest, state: _StreamState, out, finish, exc: Exception):
    """Scoring failed where nothing unscored may pass: drop what is held; 503 if nothing was sent yet."""
    guard.metrics.scoring_errors.inc()
    state.held.clear()
    error = f"scoring failed: {exc}"
    if out.prepared:
        await finish(pol.ERROR, [], error=error)
        return out
    await guard.record(
        request_id=request[REQUEST_ID],
        endpoint=request.path,
        model=req.model,
        action=pol.ERROR,
        stream=True,
        reports=[],
        prompts=req.prompts,
        completions=[],
        error=error,
    )
    return error_response(
        503, error + " (the policy fails closed: nothing unscored is returned)", "scoring_error", request[REQUEST_ID]
    )
