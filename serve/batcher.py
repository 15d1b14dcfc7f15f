"""Micro-batching for the scorer: concurrent requests share one model forward.

The scorer is blocking (a torch forward), so it runs on one worker thread; the event loop stays free. While a batch
is being scored, new requests queue up and form the next batch; nobody waits for a batch to fill, so a lone request
is scored at once and a busy server scores up to ``max_batch`` exchanges per forward.

Bounds: at most ``max_queue`` exchanges wait (past it ``score`` raises ``ScoringOverloaded`` at once); a caller
waits at most ``timeout`` seconds (``ScoringTimeout``; a scorer that hangs fails requests instead of hanging them);
a batch that fails is scored again one exchange at a time, so one bad exchange fails only its own caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)


class ScoringOverloaded(RuntimeError):
    """More exchanges wait to be scored than the queue holds."""


class ScoringTimeout(RuntimeError):
    """Scoring did not finish within the deadline."""


# (pairs, captures, since) -> reports
ScoreBatchFn = Callable[[Sequence[tuple[str, str]], Sequence[Any], Sequence[int | None]], list[Any]]


class ScoreBatcher:
    """``await batcher.score(prompt, completion)`` from any number of tasks; one worker thread scores in batches.

    ``score_batch(pairs, captures, since)`` is the scorer's (``Scorer.score_batch``); ``capture`` and ``since`` are
    passed through."""

    def __init__(
        self,
        score_batch: ScoreBatchFn,
        max_batch: int = 32,
        metrics=None,
        max_queue: int = 1024,
        timeout: float | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}.")
        self._score_batch = score_batch
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._timeout = timeout
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
            self._executor.shutdown(wait=False, cancel_futures=True)  # a hung scorer must not hang shutdown
            self._executor = None

    async def score(self, prompt: str, completion: str, capture: Any = None, since: int | None = None) -> Any:
        """The scorer's report for one (prompt, completion); raises what the scorer raised for its batch.
        ``capture`` (a ``serve.scoring.Capture`` or None) and ``since`` (how much of the completion was scored
        before, or None) are handed to ``score_batch`` with its pair."""
        if self._queue is None:
            raise RuntimeError("ScoreBatcher.start() was not awaited.")
        if self._queue.qsize() >= self._max_queue:
            raise ScoringOverloaded(f"{self._max_queue} exchanges already wait to be scored")
        fut = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        self._queue.put_nowait(((prompt, completion), capture, since, fut))
        try:
            return await asyncio.wait_for(fut, self._timeout)  # a timeout cancels fut: the worker then skips it
        except asyncio.TimeoutError:
            raise ScoringTimeout(f"scoring took longer than {self._timeout:g}s") from None
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
            items = [item for item in items if not item[-1].cancelled()]  # clients that went away
            if not items:
                continue
            if self._metrics is not None:
                self._metrics.batch_size.observe(len(items))
            try:
                self._settle(items, await self._call(loop, items))
            except Exception as e:  # the batch failed: score each alone, so one bad exchange fails only itself
                logger.warning("scoring a batch of %d failed: %s", len(items), e)
                for item in items if len(items) > 1 else []:
                    if item[-1].done():
                        continue
                    try:
                        self._settle([item], await self._call(loop, [item]))
                    except Exception as e_one:  # the callers decide what a failure means (fail open or closed)
                        _fail(item[-1], e_one)
                if len(items) == 1:
                    _fail(items[0][-1], e)

    async def _call(self, loop, items: list) -> list:
        pairs = [pair for pair, _, _, _ in items]
        captures = [cap for _, cap, _, _ in items]
        since = [start for _, _, start, _ in items]
        reports = await loop.run_in_executor(self._executor, self._score_batch, pairs, captures, since)
        if len(reports) != len(pairs):
            raise RuntimeError(f"the scorer returned {len(reports)} reports for {len(pairs)} exchanges")
        return reports

    @staticmethod
    def _settle(items: list, reports: list) -> None:
        for (*_, fut), report in zip(items, reports):
            if not fut.done():
                fut.set_result(report)


def _fail(fut: asyncio.Future, exc: Exception) -> None:
    if not fut.done():
        fut.set_exception(exc)
