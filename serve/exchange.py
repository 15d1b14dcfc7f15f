"""The generation endpoints (``/v1/completions``, ``/v1/chat/completions``): validate, forward, score, apply the
policy, audit, answer. Streams go to ``serve.streams``; this module answers the non-streamed ones."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

from serve import policy as pol
from serve.disclose import client_headers, client_leakage
from serve.responses import CLIENT_REQUEST_ID, GUARD, REQUEST_ID, UpstreamError, error_response
from serve.scoring import Capture
from serve.streams import relay_stream
from serve.validate import ParsedRequest, parse_chat, parse_completion, parse_json

if TYPE_CHECKING:
    from serve.app import Guard

logger = logging.getLogger(__name__)


async def completions(request: web.Request) -> web.StreamResponse:
    guard: Guard = request.app[GUARD]
    body = parse_json(await request.read())
    return await _generate(request, parse_completion(body, guard.tokenizer, guard.limits), guard)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    guard: Guard = request.app[GUARD]
    body = parse_json(await request.read())
    return await _generate(request, parse_chat(body, guard.tokenizer, guard.limits), guard)


def _upstream_body(raw: bytes) -> dict:
    """vLLM's answer, refused (502) unless it is an object with a list of choice objects."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise UpstreamError(502, "vLLM's answer is not a completion object")
    return body


async def _generate(request: web.Request, req: ParsedRequest, guard: Guard) -> web.StreamResponse:
    request_id = request[REQUEST_ID]
    if not await guard.known_model(req.model):
        return error_response(
            404, f"model {req.model[:64]!r} is not served here; see /v1/models", "not_found_error", request_id
        )
    upstream_body, capture_key = guard.mark(req.body)
    raw = json.dumps(upstream_body).encode()
    if req.stream:
        return await relay_stream(request, req, guard, raw, capture_key)
    started = time.perf_counter()
    status, body_bytes = await guard.post(request.path, raw)
    upstream_ms = 1000 * (time.perf_counter() - started)
    guard.metrics.upstream_seconds.observe(upstream_ms / 1000)
    if status != 200:  # vLLM refused the request (no completion in it): pass its error on
        return web.Response(
            body=body_bytes, status=status, content_type="application/json", headers={"X-Request-Id": request_id}
        )
    body = _upstream_body(body_bytes)
    choices = body["choices"]
    prompts = [req.prompts[min(_index(c, i) // req.n, len(req.prompts) - 1)] for i, c in enumerate(choices)]
    texts = [pol.choice_text(c, req.chat) for c in choices]
    captures = None
    if capture_key is not None:  # score the tokens vLLM used; the client gets them only if it asked
        ids, _ = pol.take_token_ids(body, keep=bool(req.body.get("return_token_ids")))
        found = [ids.get(_index(c, i), (None, None)) for i, c in enumerate(choices)]
        captures = [Capture(capture_key, True, p_ids, c_ids) for p_ids, c_ids in found]
    exchange = dict(request_id=request_id, client_request_id=request[CLIENT_REQUEST_ID], endpoint=request.path,
                    model=req.model, stream=False, prompts=prompts, completions=texts)  # fmt: skip
    start = time.perf_counter()
    try:
        reports, error = await guard.score_all(list(zip(prompts, texts)), captures), None
    except Exception as e:
        guard.metrics.scoring_errors.inc()
        logger.warning("request %s: scoring failed: %s", request_id, e)
        reports, error = [], f"scoring failed: {e}"
    scoring_ms = 1000 * (time.perf_counter() - start)
    blocked = None
    if error is not None:
        if not guard.settings.fail_open:
            await guard.record(**exchange, action=pol.ERROR, reports=[], error=error)
            return error_response(503, _CLOSED, "scoring_error", request_id)
        leak = pol.leakage_object(guard.settings.policy, pol.ERROR, [], error=error)
    else:
        action = pol.decide(guard.settings.policy, any(r.flagged for r in reports))
        leak = pol.leakage_object(guard.settings.policy, action, reports)
        if action == pol.BLOCKED:
            body, blocked = pol.block_choices(body, reports, guard.settings.refusal, req.chat)
    await guard.record(**exchange, action=leak["action"], reports=reports, upstream_ms=upstream_ms,
                       scoring_ms=scoring_ms, error=error)  # fmt: skip
    guard.count(leak)
    level = guard.settings.disclose
    body["leakage"] = client_leakage(leak, level, blocked)
    return web.json_response(body, headers=client_headers(leak, level, request_id))


_CLOSED = "scoring failed; the policy fails closed: nothing unscored is returned"


def _index(choice: dict, default: int) -> int:
    index = choice.get("index", default)
    return index if isinstance(index, int) and not isinstance(index, bool) and index >= 0 else default
