"""The guard's audit log: one durable row per scored exchange, in SQLite (WAL mode, fsync on every commit).

Raw prompt and completion text is stored only when the operator asks for it (``store_text=True``); otherwise a row
holds SHA-256 hashes of both texts, the character spans of the flagged excerpts and the scores with their excerpt
text removed. API keys and request headers have no field here and are never written.

Writes go through one writer thread that commits many queued records per transaction (group commit).
``AuditLog.append`` returns a ``concurrent.futures.Future`` that resolves to the row id only after the transaction
holding the record has committed, so a caller that replies to its client after the future resolves never
acknowledges a record a crash could lose. ``serve.audit_file`` holds the file's schema and ``read_records``, which
reads such a log (or a JSONL file) back, for ``atu audit``; both are importable from here too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import sqlite3
import threading
import time as _time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from serve.audit_file import (
    ACTIONS,
    COLUMNS,
    FORMAT_VERSION,
    SQLITE_MAGIC,
    AuditError,
    AuditFormatError,
    check_file,
    connect,
    iter_jsonl,
    iter_sqlite,
    read_records,
)
from serve.audit_record import AuditRecord, iso_time, sha256_text

__all__ = [
    "ACTIONS", "FORMAT_VERSION", "SQLITE_MAGIC", "UNFINISHED", "AuditClosedError", "AuditError", "AuditFormatError",
    "AuditLog", "AuditRecord", "iter_jsonl", "iter_sqlite", "read_records", "sha256_text",
]  # fmt: skip

logger = logging.getLogger(__name__)

# Keys holding text the model or the user produced; dropped from stored scores unless store_text.
_TEXT_KEYS = frozenset({"excerpt", "text"})


class AuditClosedError(AuditError):
    """``append`` was called after ``close``."""


def _strip_text(obj: Any) -> Any:
    """A copy of a JSON-like value without the text-bearing keys, at any depth."""
    if isinstance(obj, dict):
        return {k: _strip_text(v) if isinstance(v, (dict, list)) else v for k, v in obj.items() if k not in _TEXT_KEYS}
    return [_strip_text(v) if isinstance(v, (dict, list)) else v for v in obj]


def _unfinished_row(log: AuditLog, request_id, endpoint, model, policy, client_request_id, time) -> tuple:
    rec = AuditRecord(request_id=request_id, endpoint=endpoint, model=model, policy=policy, action="error",
                      stream=True, scores={"error": UNFINISHED}, time=time,
                      client_request_id=client_request_id)  # fmt: skip
    return log._row(rec)


_STOP = object()
UNFINISHED = "unfinished: the guard stopped before this stream ended (its text was partly delivered)"


@dataclasses.dataclass(frozen=True)
class _OpenMark:
    """A stream about to send its first byte: committed before that byte, removed when its record is."""

    request_id: str
    endpoint: str
    model: str
    policy: str
    client_request_id: str | None
    time: float


def _settle(fut: concurrent.futures.Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Resolve a caller's future; one the caller cancelled meanwhile (a timeout, a shutdown) is left alone, so that
    the writer thread never dies on it and strands every later append."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _create_private(path: Path) -> None:
    """Create the log file readable by its owner only: it holds scores, hashes and maybe raw text. SQLite gives
    the WAL and shared-memory files the database file's permissions."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass


class AuditLog:
    """Append-only SQLite audit log with a group-committing writer thread. Thread- and asyncio-safe.

    Args:
        path: the database file; created with its schema if absent, reopened (ids continue) if present.
        store_text: store raw prompt/completion text and excerpts. Off by default: hashes and spans only.
        max_batch: most records committed in one transaction.
    """

    def __init__(self, path: str | Path, store_text: bool = False, max_batch: int = 1024):
        self.path = Path(path)
        self.store_text = store_text
        self.max_batch = max_batch
        check_file(self.path)
        _create_private(self.path)
        self._conn = connect(self.path)
        self.recovered = self._recover()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        logger.info("audit log %s open (store_text=%s)", self.path, store_text)

    # -- writing ---------------------------------------------------------------------------------------------

    def _row(self, rec: AuditRecord) -> tuple:
        if rec.action not in ACTIONS:
            raise ValueError(f"AuditRecord.action must be one of {ACTIONS}, got {rec.action!r}.")
        if not isinstance(rec.request_id, str):
            raise ValueError(f"AuditRecord.request_id must be a str, got {type(rec.request_id).__name__}.")
        t = _time.time() if rec.time is None else float(rec.time)
        scores = rec.scores if self.store_text else _strip_text(dict(rec.scores))
        keep = self.store_text
        return (
            iso_time(t), t, rec.request_id, rec.endpoint, rec.model, rec.policy, rec.action, int(bool(rec.stream)),
            json.dumps(list(rec.flagged)), json.dumps(scores, allow_nan=False), rec.max_score,
            rec.prompt_sha256 or sha256_text(rec.prompt), rec.completion_sha256 or sha256_text(rec.completion),
            json.dumps(rec.spans), rec.upstream_ms, rec.scoring_ms,
            rec.prompt if keep else None, rec.completion if keep else None, rec.client_request_id,
        )  # fmt: skip

    def append(self, record: AuditRecord) -> concurrent.futures.Future:
        """Queue a record; the returned future resolves to its row id once the record's transaction committed.

        Raises ValueError for an invalid record and AuditClosedError after close(); a failed commit is set as
        the future's exception (AuditError).
        """
        row = self._row(record)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise AuditClosedError(f"{self.path}: audit log is closed; open a new AuditLog to append.")
            self._queue.put((row, fut))
        return fut

    def open_stream(
        self, request_id: str, endpoint: str, model: str, policy: str, client_request_id: str | None = None
    ) -> concurrent.futures.Future:
        """Mark a stream as started; the future resolves once the mark is durable. The stream's ``append`` (any
        record with this request id, or ``id#i``) removes it; a log reopened after a crash turns every mark left
        into an ``error`` record (``UNFINISHED``), so a stream that delivered a byte always has a record."""
        mark = _OpenMark(request_id, endpoint, model, policy, client_request_id, _time.time())
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise AuditClosedError(f"{self.path}: audit log is closed; open a new AuditLog to append.")
            self._queue.put((mark, fut))
        return fut

    def _recover(self) -> int:
        """Records for the streams a previous process left open (killed mid-stream); returns how many."""
        marks = self._conn.execute(
            "SELECT request_id, endpoint, model, policy, client_request_id, time_unix FROM open_streams"
        ).fetchall()
        if not marks:
            return 0
        self._commit([(_unfinished_row(self, *m), concurrent.futures.Future()) for m in marks])  # removes the marks
        logger.warning("audit log %s: %d streams left unfinished by a previous run, recorded", self.path, len(marks))
        return len(marks)

    def append_sync(self, record: AuditRecord, timeout: float | None = None) -> int:
        """Append and wait for the commit; returns the row id."""
        return self.append(record).result(timeout)

    async def append_async(self, record: AuditRecord) -> int:
        """Append and await the commit without blocking the event loop; returns the row id."""
        return await asyncio.wrap_future(self.append(record))

    def pending(self) -> int:
        """Records queued but not yet committed (approximate)."""
        return self._queue.qsize()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(item is _STOP for item in batch):
                stop = True
                batch = [item for item in batch if item is not _STOP]
            if batch:
                self._commit(batch)
        self._conn.close()

    def _commit(self, items: list) -> None:
        sql = f"INSERT INTO records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        marks = [(m, fut) for m, fut in items if isinstance(m, _OpenMark)]
        batch = [(row, fut) for row, fut in items if not isinstance(row, _OpenMark)]
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(sql, [row for row, _ in batch])
            last = self._conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            closed = {(row[2].split("#")[0],) for row, _ in batch}  # column 2: request_id
            self._conn.executemany("DELETE FROM open_streams WHERE request_id = ?", sorted(closed))
            self._conn.executemany(
                "INSERT OR REPLACE INTO open_streams VALUES (?, ?, ?, ?, ?, ?)",
                [(m.request_id, m.time, m.endpoint, m.model, m.policy, m.client_request_id) for m, _ in marks],
            )
            self._conn.execute("COMMIT")
        except BaseException as e:  # the writer thread must survive to fail later futures, not strand them
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            logger.error("audit log %s: commit of %d records failed: %s", self.path, len(batch), e)
            err = AuditError(f"{self.path}: audit commit failed ({type(e).__name__}: {e}).")
            for _, fut in items:
                _settle(fut, exc=err)
            return
        for _, fut in marks:
            _settle(fut, result=None)
        # One writer holds the write lock for the whole transaction and AUTOINCREMENT takes max + 1, so the
        # batch's ids are consecutive and end at the last inserted rowid.
        for i, (_, fut) in enumerate(batch):
            _settle(fut, result=last - len(batch) + 1 + i)

    def close(self) -> None:
        """Commit everything queued, stop the writer and close the database. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()
        logger.info("audit log %s closed", self.path)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------------------------

    def iter_records(self, since: float | datetime | None = None) -> Iterator[AuditRecord]:
        """Committed records in id order, those at or after ``since`` (unix time or datetime) if given."""
        return iter_sqlite(self.path, since)
