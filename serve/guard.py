"""What the guard's handlers share: settings, scorer, tokenizer, audit log, metrics, the upstream client.

``Guard`` holds them and offers the steps every exchange takes through them: mark a request for the capture plugin,
score through the micro-batcher, commit audit records durably, count what was decided."""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

from serve.batcher import ScoreBatcher
from serve.capture import XARG
from serve.disclose import concept_id, concept_ids
from serve.metrics import GuardMetrics
from serve.responses import AuditUnavailable
from serve.settings import GuardSettings
from serve.upstream import Upstream
from serve.validate import Limits

logger = logging.getLogger(__name__)


class Guard:
    """The guard's shared state. ``scorer``: a ``serve.scoring.Scorer`` (or anything with its ``score_batch``;
    ``uses_captures``, ``capture_status``, ``release`` and ``count_captures`` when it reads captured states)."""

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
        self.upstream = Upstream(settings, self.metrics)
        self.limits = Limits.from_settings(settings, _vocab_size(tokenizer))
        self._concept_ids = concept_ids(getattr(scorer, "labels", None) or [])
        self.active = 0  # generation requests in flight (the middleware's concurrency limit)
        # The capture backend reads the states vLLM recorded while generating: requests are marked for it.
        self.capture = bool(getattr(scorer, "uses_captures", False))
        if self.capture:
            scorer.count_captures(self._count_capture)
        self._models: set[str] = set()
        # one thread for the capture plugin's calls: the loop's default executor would grow to several and keep them
        self._plugin = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atu-release")

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self, _app=None) -> None:
        await self.upstream.start()
        await self.batcher.start()

    async def stop(self, _app=None) -> None:
        await self.batcher.stop()
        self._plugin.shutdown(wait=False)
        await self.upstream.close()

    # -- upstream ----------------------------------------------------------------------------------------------
    async def known_model(self, name: str) -> bool:
        """Whether vLLM serves ``name``; the list is cached and refreshed when a name is not in it."""
        if name not in self._models:
            self._models = await self.upstream.models()
        return name in self._models

    def mark(self, body: dict) -> tuple[dict, str | None]:
        """The upstream body, marked for the capture plugin when the scorer reads captured states, and the key.

        vLLM is also asked for the token ids it used (``return_token_ids``), so that the scorer scores exactly
        those; they are taken out of the response unless the client asked for them."""
        xargs = body.get("vllm_xargs")
        if not self.capture or not (xargs is None or isinstance(xargs, dict)):
            return body, None  # a malformed vllm_xargs is vLLM's to refuse
        key = uuid.uuid4().hex
        return {**body, "vllm_xargs": {**(xargs or {}), XARG: key}, "return_token_ids": True}, key

    # -- capture plugin ----------------------------------------------------------------------------------------
    async def capture_status(self) -> str | None:
        """None without the capture backend; else "ok" or why its plugin does not answer."""
        if not self.capture:
            return None
        return await asyncio.get_running_loop().run_in_executor(None, self.scorer.capture_status)

    async def release_capture(self, key: str) -> None:
        """Ask the capture plugin to forget the states recorded under ``key`` (a stream that ended early)."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._plugin, self.scorer.release, key)
        except Exception as e:  # the plugin's memory budget drops them in the end anyway
            logger.warning("could not release captured states %s: %s", key, e)

    def _count_capture(self, captured: int, fell_back: int) -> None:
        self.metrics.capture.labels("captured").inc(captured)
        self.metrics.capture.labels("fallback").inc(fell_back)

    # -- scoring, audit, metrics -------------------------------------------------------------------------------
    async def score(self, pairs: list[tuple[str, str]], captures: list | None = None, since: list | None = None):
        """Reports for ``pairs``; ``captures[i]``: a ``serve.scoring.Capture`` for pair ``i`` or None; ``since[i]``:
        how much of completion ``i`` was scored before (``Scorer.score_batch``), or None."""
        captures = captures or [None] * len(pairs)
        since = since or [None] * len(pairs)
        scored = (self.batcher.score(p, c, cap, s) for (p, c), cap, s in zip(pairs, captures, since))
        return list(await asyncio.gather(*scored))

    async def commit(self, records: list) -> None:
        """Append audit records; returns once they are durable: that is the acknowledgement, so a response is only
        sent after it."""
        if self.audit is None:
            return
        try:
            await asyncio.gather(*(asyncio.wrap_future(self.audit.append(r)) for r in records))
        except Exception as e:
            logger.error("audit log write failed: %s", e)
            raise AuditUnavailable(str(e)) from None
        self.metrics.audit_records.inc(len(records))

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


def _vocab_size(tokenizer) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return None
