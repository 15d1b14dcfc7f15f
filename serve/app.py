"""The guard: an OpenAI-compatible proxy in front of a vLLM server that scores every exchange for leakage.

Endpoints: ``/v1/completions`` and ``/v1/chat/completions`` (streamed or not), ``/v1/models``, ``/v1/leakage``
(score any text), ``/live`` (liveness: the guard's event loop answers), ``/ready`` and its older name ``/health``
(readiness: vLLM answers and, with the capture backend, so does the capture plugin; no key needed for these three)
and ``/metrics`` (Prometheus).

A response is sent only after its exchange was scored and its audit record committed: what the client received,
the audit log holds. Upstream failures are answered 503 (unreachable) or 504 (too slow) within the timeouts.
This module holds the handlers; ``serve.guard`` what they share, ``serve.exchange`` and ``serve.streams`` the two
ways of answering a generation request.
"""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web

from serve import policy as pol
from serve.audit_record import AuditRecord
from serve.exchange import Exchange, answer
from serve.guard import Guard
from serve.middleware import guard_middleware
from serve.responses import CLIENT_REQUEST_ID, GUARD, REQUEST_ID, UpstreamError, error_response
from serve.settings import GuardSettings
from serve.streams import relay
from serve.validate import ParsedRequest, parse_chat, parse_completion, parse_json, parse_leakage, parse_tokens_call

__all__ = ["Guard", "build_app"]

logger = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", GuardSettings)


# -- handlers -----------------------------------------------------------------------------------------------------


async def live(request: web.Request) -> web.Response:
    """Liveness: the guard's event loop answers. A restart helps only when this fails; an unready upstream is not a
    reason to restart the guard."""
    return web.json_response({"status": "ok"})


async def health(request: web.Request) -> web.Response:
    """Readiness (also served as /health): vLLM answers its /health, and the capture plugin its socket when the
    capture backend is used. 503 until both do, so a load balancer sends no traffic the guard cannot serve."""
    guard: Guard = request.app[GUARD]
    try:
        resp = await guard.upstream.open("GET", "/health")
        async with resp:
            up = "ok" if resp.status == 200 else f"status {resp.status}"
    except UpstreamError as e:
        up = str(e)
    body = {"upstream": up, "policy": guard.settings.policy}
    ready = up == "ok"
    capture = await guard.capture_status()
    if capture is not None:
        body["capture"] = capture
        ready = ready and capture == "ok"
    body["status"] = "ok" if ready else "degraded"
    return web.json_response(dict(sorted(body.items())), status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    guard: Guard = request.app[GUARD]
    return web.Response(body=guard.metrics.render(), headers={"Content-Type": guard.metrics.content_type})


async def passthrough(request: web.Request) -> web.Response:
    """Endpoints that generate no text (/v1/models, /tokenize, /detokenize): checked, relayed, nothing to score."""
    guard: Guard = request.app[GUARD]
    body = None
    if request.method == "POST":
        body = json.dumps(parse_tokens_call(request.path, parse_json(await request.read()), guard.limits)).encode()
    status, data = await guard.upstream.call(request.method, request.path, body)
    return web.Response(body=data, status=status, content_type="application/json")


async def leakage(request: web.Request) -> web.Response:
    """The operator's view: the full report of any text (the middleware lets only the operator key in)."""
    guard: Guard = request.app[GUARD]
    prompt, completion = parse_leakage(parse_json(await request.read()))
    start = time.perf_counter()
    try:
        (report,) = await guard.score([(prompt, completion)])
    except Exception as e:
        guard.metrics.scoring_errors.inc()
        return error_response(503, f"scoring failed: {e}", "scoring_error", request[REQUEST_ID])
    record = AuditRecord.from_exchange(
        report, request_id=request[REQUEST_ID], client_request_id=request[CLIENT_REQUEST_ID], endpoint="/v1/leakage",
        policy=guard.settings.policy, action=pol.decide("monitor", bool(report.flagged)), prompt=prompt,
        completion=completion, scoring_ms=1000 * (time.perf_counter() - start),
    )  # fmt: skip
    await guard.commit([record])
    return web.json_response({"request_id": request[REQUEST_ID], **report.to_dict()})


async def completions(request: web.Request) -> web.StreamResponse:
    guard: Guard = request.app[GUARD]
    body = parse_json(await request.read())
    return await generate(request, parse_completion(body, guard.tokenizer, guard.limits))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    guard: Guard = request.app[GUARD]
    body = parse_json(await request.read())
    return await generate(request, parse_chat(body, guard.tokenizer, guard.limits))


async def generate(request: web.Request, req: ParsedRequest) -> web.StreamResponse:
    """A generation request, once parsed: the model checked, the request marked, answered whole or streamed."""
    guard: Guard = request.app[GUARD]
    if not await guard.known_model(req.model):
        return error_response(
            404, f"model {req.model[:64]!r} is not served here; see /v1/models", "not_found_error", request[REQUEST_ID]
        )
    upstream_body, capture_key = guard.mark(req.body)
    exchange = Exchange(guard, request, req, capture_key)
    raw = json.dumps(upstream_body).encode()
    return await (relay(exchange, raw) if req.stream else answer(exchange, raw))


def build_app(guard: Guard) -> web.Application:
    """The aiohttp application; the guard's session and batcher start and stop with it."""
    app = web.Application(middlewares=[guard_middleware], client_max_size=guard.settings.max_body_bytes)
    app[GUARD] = guard
    app[SETTINGS] = guard.settings
    app.on_startup.append(guard.start)
    app.on_cleanup.append(guard.stop)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", health)
    app.router.add_get("/live", live)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", passthrough)
    app.router.add_post("/v1/leakage", leakage)
    app.router.add_post("/tokenize", passthrough)
    app.router.add_post("/detokenize", passthrough)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app
