"""What every request goes through before a handler: ids, keys, the concurrency limit, errors in the OpenAI shape.

Two keys: the client key (``api_key``) opens the generation endpoints; the operator key (``operator_key``) opens
the operator-only views (``/v1/leakage``, ``/metrics``), which name concepts and show scores. A client key never
opens them, and with no operator key set they answer 403: a guard nobody configured does not publish its
forgotten set. Every error, expected or not, is answered as ``{"error": {...}}`` with a 4xx where the client is at
fault; an unexpected exception is logged and answered 500 in the same shape, never as plain text.
"""

from __future__ import annotations

import hmac
import logging
import uuid

from aiohttp import web

from serve.params import BadRequest
from serve.responses import (
    CLIENT_REQUEST_ID,
    GUARD,
    PROBE_PATHS,
    REQUEST_ID,
    AuditUnavailable,
    UpstreamError,
    error_response,
)

logger = logging.getLogger(__name__)

OPERATOR_PATHS = frozenset({"/v1/leakage", "/metrics"})
LIMITED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/leakage"})
_MAX_CLIENT_ID = 128


def client_request_id(request: web.Request) -> str | None:
    """The client's own ``X-Request-Id``, kept beside the guard's id (never as the key: clients may reuse it);
    None when absent or not short printable ASCII."""
    value = request.headers.get("X-Request-Id")
    if value and len(value) <= _MAX_CLIENT_ID and value.isascii() and value.isprintable():
        return value
    return None


def bearer_matches(request: web.Request, key: str) -> bool:
    """Whether ``Authorization: Bearer <key>`` was sent; any header bytes compare without raising."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    # aiohttp decodes header bytes with surrogateescape: encode them back the same way, never raise on them
    sent = token.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, key.encode())


def _refusal(request: web.Request, guard) -> web.Response | None:
    """401/403 when the request lacks the key its path needs, else None."""
    s, rid = guard.settings, request[REQUEST_ID]
    if request.path in OPERATOR_PATHS:
        if s.operator_key is None:
            return error_response(
                403, "the operator view is off: start the guard with an operator key", "permission_error", rid
            )
        if not bearer_matches(request, s.operator_key):
            return error_response(401, "this view needs the operator key", "authentication_error", rid)
        return None
    if s.api_key and request.path not in PROBE_PATHS and not bearer_matches(request, s.api_key):
        return error_response(
            401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error", rid
        )
    return None


async def _dispatch(request: web.Request, handler, guard) -> web.StreamResponse:
    refusal = _refusal(request, guard)
    if refusal is not None:
        return refusal
    rid, limited = request[REQUEST_ID], request.path in LIMITED_PATHS
    if limited and guard.active >= guard.settings.max_concurrency:
        resp = error_response(429, "too many requests in flight; retry shortly", "rate_limit_error", rid)
        resp.headers["Retry-After"] = "1"
        return resp
    guard.active += limited
    try:
        return await handler(request)
    finally:
        guard.active -= limited


async def _answer(request: web.Request, handler, guard) -> web.StreamResponse:
    rid = request[REQUEST_ID]
    try:
        return await _dispatch(request, handler, guard)
    except web.HTTPRequestEntityTooLarge:
        return error_response(
            413, f"the body is larger than {guard.settings.max_body_bytes} bytes", "invalid_request_error", rid
        )
    except BadRequest as e:
        return error_response(400, str(e), "invalid_request_error", rid)
    except UpstreamError as e:
        return error_response(e.status, str(e), "upstream_error", rid)
    except AuditUnavailable:
        return error_response(503, "the audit log is unavailable; the exchange was not served", "audit_error", rid)
    except web.HTTPException as e:
        return error_response(e.status, e.reason, "invalid_request_error", rid)
    except ConnectionResetError:
        raise  # the client left; nothing can be answered
    except Exception:
        logger.exception("request %s to %s failed", rid, request.path)
        return error_response(500, "internal error", "server_error", rid)


@web.middleware
async def guard_middleware(request: web.Request, handler):
    guard = request.app[GUARD]
    request[REQUEST_ID] = f"atu-{uuid.uuid4().hex}"
    request[CLIENT_REQUEST_ID] = client_request_id(request)
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    guard.metrics.in_flight.inc()
    try:
        resp = await _answer(request, handler, guard)
        if 400 <= resp.status < 500:
            guard.metrics.rejected.labels(str(resp.status)).inc()
        guard.metrics.requests.labels(endpoint, str(resp.status)).inc()
        return resp
    finally:
        guard.metrics.in_flight.dec()
