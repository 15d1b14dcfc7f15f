"""The guard: an OpenAI-compatible proxy in front of a vLLM server that scores every exchange for leakage.

Endpoints: ``/v1/completions`` and ``/v1/chat/completions`` (streamed or not), ``/v1/models``, ``/v1/leakage``
(score any text), ``/live`` (liveness: the guard's event loop answers), ``/ready`` and its older name ``/health``
(readiness: vLLM answers and, with the capture backend, so does the capture plugin; no key needed for these three)
and ``/metrics`` (Prometheus).

A response is sent only after its exchange was scored and its audit record committed: what the client received,
the audit log holds. Upstream failures are answered 503 (unreachable) or 504 (too slow) within the timeouts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from aiohttp import web

from serve import policy as pol
from serve.batcher import ScoreBatcher
from serve.capture import XARG
from serve.disclose import concept_id, concept_ids
from serve.exchange import chat_completions, completions
from serve.metrics import GuardMetrics
from serve.middleware import guard_middleware
from serve.responses import CLIENT_REQUEST_ID, GUARD, REQUEST_ID, AuditUnavailable, UpstreamError, error_response
from serve.settings import GuardSettings
from serve.validate import (
    Limits,
    parse_json,
    parse_leakage,
    parse_tokens_call,
)

logger = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", GuardSettings)


class Guard:
    """Holds what the handlers share: settings, scorer, tokenizer, audit log, metrics, the upstream session."""

    def __init__(self, settings: GuardSettings, scorer, tokenizer, audit=None, metrics: GuardMetrics | None = None):
        self.settings = settings
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.audit = audit
        self.metrics = metrics or GuardMetrics()
        self.batcher = ScoreBatcher(
            scorer.score_batch,
            settings.max_batch,
            self.metrics,
            max_queue=settings.max_scoring_queue,
            timeout=settings.scoring_timeout,
        )
        self.limits = Limits.from_settings(settings, _vocab_size(tokenizer))
        self._concept_ids = concept_ids(getattr(scorer, "labels", None) or [])
        self.active = 0  # generation requests in flight (the middleware's concurrency limit)
        # The capture backend reads the states vLLM recorded while generating: requests are marked for it.
        backend = getattr(scorer, "backend", None)
        self.capture = bool(getattr(backend, "uses_captures", False))
        if self.capture:
            backend.listener = self._count_capture
        self.session: aiohttp.ClientSession | None = None
        self._models: set[str] = set()
        # one thread for releasing captured states: the loop's default executor would grow to several and keep them
        self._releaser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atu-release")

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self, _app=None) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)  # concurrency is the client's to choose
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        await self.batcher.start()

    async def stop(self, _app=None) -> None:
        await self.batcher.stop()
        self._releaser.shutdown(wait=False)
        if self.session is not None:
            await self.session.close()

    # -- upstream ----------------------------------------------------------------------------------------------
    def _timeout(self, stream: bool) -> aiohttp.ClientTimeout:
        s = self.settings
        if stream:  # a stream may run long; what must not stall is the gap between chunks
            return aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout, sock_read=s.upstream_timeout)
        return aiohttp.ClientTimeout(total=s.upstream_timeout, sock_connect=s.connect_timeout)

    async def upstream(self, method: str, path: str, body: bytes | None = None, stream: bool = False):
        """Open an upstream response (the caller releases it); connection problems become UpstreamError."""
        assert self.session is not None
        url = self.settings.upstream_url + path
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.settings.upstream_key:
            headers["Authorization"] = f"Bearer {self.settings.upstream_key}"
        try:
            return await self.session.request(method, url, data=body, headers=headers, timeout=self._timeout(stream))
        except asyncio.TimeoutError:
            self.metrics.upstream_errors.labels("timeout").inc()
            raise UpstreamError(504, f"vLLM did not answer within {self.settings.upstream_timeout:g}s") from None
        except aiohttp.ClientError as e:
            self.metrics.upstream_errors.labels("unreachable").inc()
            raise UpstreamError(
                503, f"vLLM is unreachable at {self.settings.upstream_url} ({type(e).__name__})"
            ) from None

    async def read_upstream(self, resp: aiohttp.ClientResponse) -> bytes:
        try:
            return await resp.read()
        except asyncio.TimeoutError:
            self.metrics.upstream_errors.labels("timeout").inc()
            raise UpstreamError(504, f"vLLM did not answer within {self.settings.upstream_timeout:g}s") from None
        except aiohttp.ClientError as e:
            self.metrics.upstream_errors.labels("broken").inc()
            raise UpstreamError(503, f"the connection to vLLM broke ({type(e).__name__})") from None

    async def post(self, path: str, raw: bytes) -> tuple[int, bytes]:
        """(status, body) of a non-streamed upstream call; vLLM's own failures (5xx) become a 502."""
        resp = await self.upstream("POST", path, raw)
        async with resp:
            body, status = await self.read_upstream(resp), resp.status
        if status >= 500:
            self.metrics.upstream_errors.labels("failed").inc()
            raise UpstreamError(502, f"vLLM failed with status {status}")
        return status, body

    async def known_model(self, name: str) -> bool:
        """Whether vLLM serves ``name``; the list is cached and refreshed when a name is not in it."""
        if name in self._models:
            return True
        resp = await self.upstream("GET", "/v1/models")
        async with resp:
            raw, status = await self.read_upstream(resp), resp.status
        try:
            if status != 200:
                raise ValueError(f"status {status}")
            self._models = {m["id"] for m in json.loads(raw).get("data", [])}
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # not what an OpenAI server answers
            self.metrics.upstream_errors.labels("bad_answer").inc()
            raise UpstreamError(503, f"vLLM's model list is unreadable ({e})") from None
        return name in self._models

    # -- scoring and audit -------------------------------------------------------------------------------------
    async def score_all(self, pairs: list[tuple[str, str]], captures: list | None = None) -> list:
        """Reports for ``pairs``; ``captures[i]``: a ``serve.scoring.Capture`` for pair ``i`` or None."""
        captures = captures or [None] * len(pairs)
        return list(await asyncio.gather(*(self.batcher.score(p, c, cap) for (p, c), cap in zip(pairs, captures))))

    def mark(self, body: dict) -> tuple[dict, str | None]:
        """The upstream body, marked for the capture plugin when the scorer reads captured states, and the key.

        vLLM is also asked for the token ids it used (``return_token_ids``), so that the scorer scores exactly
        those; they are taken out of the response unless the client asked for them."""
        xargs = body.get("vllm_xargs")
        if not self.capture or not (xargs is None or isinstance(xargs, dict)):
            return body, None  # a malformed vllm_xargs is vLLM's to refuse
        key = uuid.uuid4().hex
        return {**body, "vllm_xargs": {**(xargs or {}), XARG: key}, "return_token_ids": True}, key

    async def record(
        self,
        *,
        prompts: list[str],
        completions: list[str],
        reports: list,
        request_id: str,
        error: str | None = None,
        client_request_id: str | None = None,
        **fields,
    ) -> None:
        """Commit the audit records of one exchange (one per choice); returns once they are durable: that is the
        acknowledgement, so a response is only sent after it."""
        if self.audit is None:
            return
        records = audit_records(
            self.settings,
            client_request_id=client_request_id,
            prompts=prompts,
            completions=completions,
            reports=reports,
            request_id=request_id,
            error=error,
            **fields,
        )
        try:
            await asyncio.gather(*(asyncio.wrap_future(self.audit.append(r)) for r in records))
        except Exception as e:
            logger.error("audit log write failed: %s", e)
            raise AuditUnavailable(str(e)) from None
        self.metrics.audit_records.inc(len(records))

    async def release_capture(self, key: str) -> None:
        """Ask the capture plugin to forget the states recorded under ``key`` (a stream that ended early)."""
        client = getattr(getattr(self.scorer, "backend", None), "client", None)
        if client is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._releaser, client.fetch, [key], True)
        except Exception as e:  # the plugin's memory budget drops them in the end anyway
            logger.warning("could not release captured states %s: %s", key, e)

    async def open_stream(self, request_id: str, endpoint: str, model: str, client_request_id: str | None) -> None:
        """Mark a stream as started in the audit log, durably, before its first byte is sent."""
        if self.audit is None:
            return
        try:
            mark = self.audit.open_stream(request_id, endpoint, model, self.settings.policy, client_request_id)
            await asyncio.wrap_future(mark)
        except Exception as e:
            logger.error("audit log write failed: %s", e)
            raise AuditUnavailable(str(e)) from None

    def _count_capture(self, captured: int, fell_back: int) -> None:
        self.metrics.capture.labels("captured").inc(captured)
        self.metrics.capture.labels("fallback").inc(fell_back)

    def metric_label(self, concept: str) -> str:
        return concept if self.settings.metric_concept_names else concept_id(concept, self._concept_ids)

    def count(self, leakage: dict) -> None:
        for c in leakage["flagged"]:
            self.metrics.flagged.labels(self.metric_label(c)).inc()
        for c in leakage["prompt_flagged"]:
            self.metrics.prompt_flagged.labels(self.metric_label(c)).inc()
        if leakage.get("max_score") is not None:
            self.metrics.max_score.observe(leakage["max_score"])
        self.metrics.actions.labels(leakage["action"]).inc()


def audit_records(
    settings: GuardSettings, *, prompts, completions, reports, request_id, error=None, model=None, **fields
) -> list:
    """One AuditRecord per choice (request ids ``rid``, or ``rid#i`` when there are several choices)."""
    from serve.audit import AuditRecord

    n = max(len(prompts), len(completions), len(reports), 1)
    out = []
    for i in range(n):
        report = reports[i] if i < len(reports) else ({"error": error} if error else None)
        rid = request_id if n == 1 else f"{request_id}#{i}"
        prompt = prompts[i] if i < len(prompts) else None
        completion = completions[i] if i < len(completions) else None
        out.append(
            AuditRecord.from_exchange(
                request_id=rid,
                policy=settings.policy,
                model=model or "",
                prompt=prompt,
                completion=completion,
                report=report,
                **fields,
            )
        )
    return out


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
        resp = await guard.upstream("GET", "/health")
        async with resp:
            up = "ok" if resp.status == 200 else f"status {resp.status}"
    except UpstreamError as e:
        up = str(e)
    body = {"upstream": up, "policy": guard.settings.policy}
    ready = up == "ok"
    client = getattr(getattr(guard.scorer, "backend", None), "client", None) if guard.capture else None
    if client is not None:
        answers = await asyncio.get_running_loop().run_in_executor(None, client.ping)
        body["capture"] = "ok" if answers else f"no answer on {client.path}"
        ready = ready and answers
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
    resp = await guard.upstream(request.method, request.path, body)
    async with resp:
        data, status = await guard.read_upstream(resp), resp.status
    if status >= 500:
        raise UpstreamError(502, f"vLLM failed with status {status}")
    return web.Response(body=data, status=status, content_type="application/json")


async def leakage(request: web.Request) -> web.Response:
    """The operator's view: the full report of any text (the middleware lets only the operator key in)."""
    guard: Guard = request.app[GUARD]
    prompt, completion = parse_leakage(parse_json(await request.read()))
    start = time.perf_counter()
    try:
        (report,) = await guard.score_all([(prompt, completion)])
    except Exception as e:
        guard.metrics.scoring_errors.inc()
        return error_response(503, f"scoring failed: {e}", "scoring_error", request[REQUEST_ID])
    scoring_ms = 1000 * (time.perf_counter() - start)
    await guard.record(
        request_id=request[REQUEST_ID],
        client_request_id=request[CLIENT_REQUEST_ID],
        endpoint="/v1/leakage",
        model=None,
        action=pol.decide("monitor", bool(report.flagged)),
        stream=False,
        reports=[report],
        prompts=[prompt],
        completions=[completion],
        scoring_ms=scoring_ms,
    )
    return web.json_response({"request_id": request[REQUEST_ID], **report.to_dict()})


def _vocab_size(tokenizer) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return None


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
