"""The guard's client to vLLM: one session, the timeouts, and the one place where an upstream failure becomes the
status the client gets: 503 (unreachable, or the connection broke), 504 (too slow), 502 (vLLM failed or answered
something unusable). Every failure is counted in ``atu_guard_upstream_errors_total`` by kind."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp

from serve.metrics import GuardMetrics
from serve.responses import UpstreamError
from serve.settings import GuardSettings

DONE = "[DONE]"  # the literal that ends an OpenAI stream
KEEPALIVE_SECONDS = 3.0  # an idle connection to vLLM is kept this long for the next request


class Upstream:
    """Requests to the vLLM server at ``settings.upstream_url``; ``start`` and ``close`` bound the session."""

    def __init__(self, settings: GuardSettings, metrics: GuardMetrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # concurrency is the client's to choose. Idle connections are dropped before the server's own keep-alive
        # (uvicorn's 5 s, vLLM's default) closes them, so that a request is not sent on a connection being closed.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=KEEPALIVE_SECONDS)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    # -- failures ----------------------------------------------------------------------------------------------
    def failure(self, exc: BaseException, phase: str) -> UpstreamError:
        """The UpstreamError for ``exc`` raised while connecting (``phase`` "open"), reading an answer ("read") or
        reading a stream ("stream"); counted by kind."""
        s = self.settings
        if isinstance(exc, asyncio.TimeoutError):
            self.metrics.upstream_errors.labels("timeout").inc()
            if phase == "stream":  # a stream may run long; what timed out is the gap between chunks
                return UpstreamError(504, f"vLLM stalled for more than {s.upstream_timeout:g}s mid-stream")
            return UpstreamError(504, f"vLLM did not answer within {s.upstream_timeout:g}s")
        if phase == "open":
            self.metrics.upstream_errors.labels("unreachable").inc()
            return UpstreamError(503, f"vLLM is unreachable at {s.upstream_url} ({type(exc).__name__})")
        self.metrics.upstream_errors.labels("broken").inc()
        where = " mid-stream" if phase == "stream" else ""
        return UpstreamError(503, f"the connection to vLLM broke{where} ({type(exc).__name__})")

    def failed(self, status: int) -> UpstreamError:
        """vLLM answered with a server error: its own failure, answered 502."""
        self.metrics.upstream_errors.labels("failed").inc()
        return UpstreamError(502, f"vLLM failed with status {status}")

    def bad_answer(self, message: str, status: int = 502) -> UpstreamError:
        """vLLM answered something no OpenAI server would."""
        self.metrics.upstream_errors.labels("bad_answer").inc()
        return UpstreamError(status, message)

    # -- requests ----------------------------------------------------------------------------------------------
    def _timeout(self, stream: bool) -> aiohttp.ClientTimeout:
        s = self.settings
        if stream:  # a stream may run long; what must not stall is the gap between chunks
            return aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout, sock_read=s.upstream_timeout)
        return aiohttp.ClientTimeout(total=s.upstream_timeout, sock_connect=s.connect_timeout)

    async def open(self, method: str, path: str, body: bytes | None = None, stream: bool = False):
        """Open an upstream response (the caller releases it, ``async with``)."""
        assert self.session is not None, "Upstream.start() was not awaited"
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.settings.upstream_key:
            headers["Authorization"] = f"Bearer {self.settings.upstream_key}"
        url = self.settings.upstream_url + path
        for attempt in range(2):
            try:
                return await self.session.request(
                    method, url, data=body, headers=headers, timeout=self._timeout(stream)
                )
            except aiohttp.ServerDisconnectedError as e:
                # Closed before any answer: a reused keep-alive connection the server was closing as the request
                # went out, which it never read. Sent once more, on a fresh connection.
                if attempt:
                    raise self.failure(e, "open") from None
            except (asyncio.TimeoutError, aiohttp.ClientError) as e:
                raise self.failure(e, "open") from None

    async def read(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body of an open response."""
        try:
            return await resp.read()
        except (asyncio.TimeoutError, aiohttp.ClientError) as e:
            raise self.failure(e, "read") from None

    async def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """(status, body) of a whole upstream call; a 5xx is vLLM's failure (502)."""
        resp = await self.open(method, path, body)
        async with resp:
            raw = await self.read(resp)
        if resp.status >= 500:
            raise self.failed(resp.status)
        return resp.status, raw

    async def events(self, resp: aiohttp.ClientResponse) -> AsyncIterator[list[tuple[bytes, dict | str]]]:
        """Per upstream read, the (raw event bytes, JSON object or ``DONE``) it completed; comments and keep-alives
        are skipped. Events that arrive together are yielded together, so the relay writes once per read; the events
        before a malformed one are yielded before it raises, however the reads split them."""
        buf = b""
        try:
            async for chunk in resp.content.iter_any():
                buf += chunk
                *complete, buf = buf.split(b"\n\n")
                batch, error = [], None
                for event in complete:
                    try:
                        data = self.parse_event(event)
                    except UpstreamError as e:
                        error = e
                        break
                    if data is not None:
                        batch.append((event + b"\n\n", data))
                if batch:
                    yield batch
                if error is not None:
                    raise error
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
            raise self.failure(e, "stream") from None

    def parse_event(self, event: bytes) -> dict | str | None:
        """An event's JSON object, ``DONE``, or None for comments and keep-alives; anything else is vLLM's fault."""
        line = event.strip()
        if not line.startswith(b"data:"):
            return None
        payload = line[5:].strip()
        if payload == DONE.encode():
            return DONE
        try:
            data = json.loads(payload)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("choices", []), list):
            raise self.bad_answer("vLLM sent a malformed stream event")
        return data

    def completion(self, raw: bytes) -> dict:
        """vLLM's non-streamed answer, refused (502) unless it is an object with a list of choice objects."""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise self.bad_answer("vLLM's answer is not a completion object")
        return body

    async def models(self) -> set[str]:
        """The model names vLLM serves."""
        resp = await self.open("GET", "/v1/models")
        async with resp:
            raw, status = await self.read(resp), resp.status
        try:
            if status != 200:
                raise ValueError(f"status {status}")
            return {m["id"] for m in json.loads(raw).get("data", [])}
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # not what an OpenAI server answers
            raise self.bad_answer(f"vLLM's model list is unreadable ({e})", 503) from None
