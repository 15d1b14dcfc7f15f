"""One generation exchange through the guard (``/v1/completions``, ``/v1/chat/completions``), streamed or not.

``Exchange`` holds what one request needs and the steps both paths share: score (timed), fail closed, conclude
(audit record, leakage annotation, metrics), pass vLLM's refusal on. ``answer`` serves a non-streamed request with
them; ``serve.streams.relay`` a streamed one. A response is sent only after its exchange was scored and its audit
record committed: what the client received, the audit log holds.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from serve import policy as pol
from serve.audit_record import AuditRecord
from serve.disclose import client_headers, client_leakage
from serve.guard import Guard
from serve.responses import CLIENT_REQUEST_ID, REQUEST_ID, error_response
from serve.scoring import Capture
from serve.validate import ParsedRequest

logger = logging.getLogger(__name__)

CLOSED = "scoring failed; the policy fails closed: nothing unscored is returned"


class Exchange:
    """One request to a generation endpoint: what it asked, how long it took, whether its record was written."""

    def __init__(self, guard: Guard, request: web.Request, req: ParsedRequest, capture_key: str | None = None):
        self.guard, self.request, self.req, self.capture_key = guard, request, req, capture_key
        self.request_id: str = request[REQUEST_ID]
        self.policy = guard.settings.policy
        self.block = self.policy == "block"
        self.scope = guard.settings.flag_scope
        self.hold = not guard.settings.fail_open  # nothing unscored may reach the client
        self.started = time.perf_counter()
        self.upstream_s: float | None = None  # until the whole answer was read; None: until the record
        self.scoring_s = 0.0
        self.recorded = False

    def prompt_of(self, choice: int) -> str:
        """The prompt that choice ``choice`` answers (``n`` choices per prompt)."""
        return self.req.prompts[min(choice // self.req.n, len(self.req.prompts) - 1)]

    async def score(self, pairs: list[tuple[str, str]], captures: list | None = None, since: list | None = None):
        start = time.perf_counter()
        try:
            return await self.guard.score(pairs, captures, since)
        finally:
            self.scoring_s += time.perf_counter() - start

    def flagged(self, reports: list) -> bool:
        """Whether any choice's report flags the exchange under the guard's flag scope."""
        return any(pol.is_flagged(r, self.scope) for r in reports)

    def scoring_failed(self, exc: Exception) -> str:
        """Count and log a scoring failure; the error the record and the annotation carry."""
        self.guard.metrics.scoring_errors.inc()
        logger.warning("request %s: scoring failed: %s", self.request_id, exc)
        return f"scoring failed: {exc}"

    async def fail_closed(self, pairs: list[tuple[str, str]], error: str) -> web.Response:
        """Scoring failed where nothing unscored may pass, and nothing was sent yet: record it and answer 503."""
        await self.record(pol.ERROR, pairs, [], error)
        return error_response(503, CLOSED, "scoring_error", self.request_id)

    async def conclude(self, action: str, pairs: list, reports: list, error: str | None = None, blocked=None):
        """Record the exchange and count its leakage; returns (the leakage object, what the client is shown)."""
        leak = pol.leakage_object(self.policy, action, reports, error=error)
        await self.record(action, pairs, reports, error)
        self.guard.count(leak)
        return leak, client_leakage(leak, self.guard.settings.disclose, blocked)

    async def record(self, action: str, pairs: list, reports: list, error: str | None = None) -> None:
        """The exchange's audit records (one per choice), written once whatever way it ended."""
        if self.recorded:
            return
        self.recorded = True
        await self.guard.commit(self.audit_records(action, pairs, reports, error))

    def audit_records(self, action: str, pairs: list, reports: list, error: str | None) -> list[AuditRecord]:
        """One AuditRecord per choice (request ids ``rid``, or ``rid#i`` when there are several choices)."""
        upstream_s = self.upstream_s if self.upstream_s is not None else time.perf_counter() - self.started
        n = max(len(pairs), len(reports), 1)
        out = []
        for i in range(n):
            report = reports[i] if i < len(reports) else ({"error": error} if error else None)
            prompt, completion = pairs[i] if i < len(pairs) else (None, None)
            out.append(AuditRecord.from_exchange(
                report, request_id=self.request_id if n == 1 else f"{self.request_id}#{i}",
                client_request_id=self.request[CLIENT_REQUEST_ID], endpoint=self.request.path, model=self.req.model,
                policy=self.policy, action=action, stream=self.req.stream, prompt=prompt, completion=completion,
                upstream_ms=1000 * upstream_s, scoring_ms=1000 * self.scoring_s,
            ))  # fmt: skip
        return out

    def refused(self, status: int, body: bytes) -> web.Response:
        """vLLM refused the request (a 4xx, no completion in it): its answer is passed on."""
        return web.Response(body=body, status=status, content_type="application/json",
                            headers={"X-Request-Id": self.request_id})  # fmt: skip


async def answer(ex: Exchange, raw: bytes) -> web.Response:
    """A non-streamed exchange: forward, score every choice, apply the policy, record, answer."""
    guard = ex.guard
    status, answer_bytes = await guard.upstream.call("POST", ex.request.path, raw)
    ex.upstream_s = time.perf_counter() - ex.started
    guard.metrics.upstream_seconds.observe(ex.upstream_s)
    if status != 200:
        return ex.refused(status, answer_bytes)
    body = guard.upstream.completion(answer_bytes)
    pairs, captures = _scored_choices(ex, body)
    blocked = None
    try:
        reports, error = await ex.score(pairs, captures), None
    except Exception as e:
        reports, error = [], ex.scoring_failed(e)
        if ex.hold:
            return await ex.fail_closed(pairs, error)
    action = pol.ERROR if error else pol.decide(ex.policy, ex.flagged(reports))
    if action == pol.BLOCKED:
        body, blocked = pol.block_choices(body, reports, guard.settings.refusal, ex.req.chat, ex.scope)
    leak, body["leakage"] = await ex.conclude(action, pairs, reports, error, blocked)
    return web.json_response(body, headers=client_headers(leak, guard.settings.disclose, ex.request_id))


def _scored_choices(ex: Exchange, body: dict) -> tuple[list[tuple[str, str]], list | None]:
    """(prompt, completion) per choice, and with the capture backend what it needs to score the tokens vLLM used
    (the client gets those only if it asked)."""
    choices = body["choices"]
    pairs = [(ex.prompt_of(_index(c, i)), pol.choice_text(c, ex.req.chat)) for i, c in enumerate(choices)]
    if ex.capture_key is None:
        return pairs, None
    ids, _ = pol.take_token_ids(body, keep=bool(ex.req.body.get("return_token_ids")))
    found = [ids.get(_index(c, i), (None, None)) for i, c in enumerate(choices)]
    return pairs, [Capture(ex.capture_key, True, p_ids, c_ids) for p_ids, c_ids in found]


def _index(choice: dict, default: int) -> int:
    index = choice.get("index", default)
    return index if isinstance(index, int) and not isinstance(index, bool) and index >= 0 else default
