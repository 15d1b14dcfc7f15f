"""Micro-batching for the scorer: concurrent requests share one model forward.

The scorer is blocking (a torch forward), so it runs on one worker thread; the event loop stays free. While a batch
is being scored, new requests queue up and form the next batch; nobody waits for a batch to fill, so a lone request
is scored at once and a busy server scores up to ``max_batch`` exchanges per forward.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

ScoreBatchFn = Callable[[Sequence[tuple[str, str]], Sequence[Any]], list[Any]]  # (pairs, captures) -> reports


class ScoreBatcher:
    """``await batcher.score(prompt, completion)`` from any number of tasks; one worker thread scores in batches.

    ``score_batch(pairs, captures)`` is the scorer's (``Scorer.score_batch``); ``capture`` is passed through."""

    def __init__(self, score_batch: ScoreBatchFn, max_batch: int = 32, metrics=None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
        self._score_batch = score_batch
        self._max_batch = max_batch
        self._metrics = metrics
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atu-scorer")
        self._task = asyncio.create_task(self._run(), name="atu-score-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._queue is not None:  # whoever still waits gets an error, not a hang
            while not self._queue.empty():
                *_, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(RuntimeError("the scorer is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def score(self, prompt: str, completion: str, capture: Any = None) -> Any:
        """The scorer's report for one (prompt, completion); raises what the scorer raised for its batch.
        ``capture`` (a ``serve.scoring.Capture`` or None) is handed to ``score_batch`` with its pair."""
        if self._queue is None:
            raise RuntimeError("ScoreBatcher.start() was not awaited.")
        fut = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        await self._queue.put(((prompt, completion), capture, fut))
        try:
            return await fut
        finally:
            if self._metrics is not None:
                self._metrics.scoring_seconds.observe(time.perf_counter() - start)

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            while len(items) < self._max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            items = [item for item in items if not item[2].cancelled()]  # clients that went away
            if not items:
                continue
            pairs = [pair for pair, _, _ in items]
            captures = [cap for _, cap, _ in items]
            if self._metrics is not None:
                self._metrics.batch_size.observe(len(pairs))
            try:
                reports = await loop.run_in_executor(self._executor, self._score_batch, pairs, captures)
                if len(reports) != len(pairs):
                    raise RuntimeError(f"the scorer returned {len(reports)} reports for {len(pairs)} exchanges")
            except Exception as e:  # the batch's callers decide what a scoring failure means (fail open/closed)
                logger.warning("scoring a batch of %d failed: %s", len(pairs), e)
                for *_, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (*_, fut), report in zip(items, reports):
                if not fut.done():
                    fut.set_result(report)
