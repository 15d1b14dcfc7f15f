"""Errors the guard answers with, in the OpenAI error shape."""

from __future__ import annotations

from aiohttp import web

REQUEST_ID = web.RequestKey("request_id", str)  # set on every request by the guard's middleware
CLIENT_REQUEST_ID = web.RequestKey("client_request_id", object)  # the client's X-Request-Id, or None
GUARD = web.AppKey("guard", object)  # the app's serve.app.Guard


class UpstreamError(Exception):
    """vLLM could not be reached (503), did not answer in time (504) or answered something unusable (502)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AuditUnavailable(Exception):
    """The audit log could not commit a record: the exchange is not acknowledged (503)."""


def error_body(status: int, message: str, kind: str) -> dict:
    """An error as OpenAI clients expect it: {"error": {"message", "type", "code"}} (a response or a stream event)."""
    return {"error": {"message": message, "type": kind, "code": status}}


def error_response(status: int, message: str, kind: str, request_id: str | None = None) -> web.Response:
    headers = {"X-Request-Id": request_id} if request_id else None
    return web.json_response(error_body(status, message, kind), status=status, headers=headers)


# Orchestrators probe these without credentials: they say whether the guard runs and can serve, nothing else.
PROBE_PATHS = ("/health", "/live", "/ready")
