"""The guard's audit log: one durable row per scored exchange, in SQLite (WAL mode, fsync on every commit).

Raw prompt and completion text is stored only when the operator asks for it (``store_text=True``); otherwise a row
holds SHA-256 hashes of both texts, the character spans of the flagged excerpts and the scores with their excerpt
text removed. API keys and request headers have no field here and are never written.

Writes go through one writer thread that commits many queued records per transaction (group commit).
``AuditLog.append`` returns a ``concurrent.futures.Future`` that resolves to the row id only after the transaction
holding the record has committed, so a caller that replies to its client after the future resolves never
acknowledges a record a crash could lose. ``read_records`` reads such a log, or a JSONL file of the same record
shape, or a JSONL traffic file of ``{"prompt", "completion", "request_id"?, "time"?}`` lines, for ``atu audit``.
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

from atu.errors import AtuError, FormatError
from serve.audit_record import AuditRecord, iso_time, sha256_text

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ACTIONS = ("passed", "annotated", "blocked", "cut", "error")
SQLITE_MAGIC = b"SQLite format 3\x00"
# Keys holding text the model or the user produced; dropped from stored scores unless store_text.
_TEXT_KEYS = frozenset({"excerpt", "text"})
_COLUMNS = (
    "time_iso", "time_unix", "request_id", "endpoint", "model", "policy", "action", "stream", "flagged", "scores",
    "max_score", "prompt_sha256", "completion_sha256", "spans", "upstream_ms", "scoring_ms", "prompt", "completion",
    "client_request_id",
)  # fmt: skip
_OPEN_STREAMS = """CREATE TABLE IF NOT EXISTS open_streams (  -- streams that sent a byte and have no record yet
    request_id TEXT PRIMARY KEY, time_unix REAL NOT NULL, endpoint TEXT NOT NULL, model TEXT NOT NULL,
    policy TEXT NOT NULL, client_request_id TEXT
)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_iso TEXT NOT NULL, time_unix REAL NOT NULL,
    request_id TEXT NOT NULL, endpoint TEXT NOT NULL, model TEXT NOT NULL, policy TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ({", ".join(repr(a) for a in ACTIONS)})),
    stream INTEGER NOT NULL,
    flagged TEXT NOT NULL,      -- JSON list of concepts flagged in the completion
    scores TEXT NOT NULL,       -- JSON LeakageReport.to_dict(), excerpt text removed unless store_text
    max_score REAL,
    prompt_sha256 TEXT, completion_sha256 TEXT,
    spans TEXT NOT NULL,        -- JSON [{"concept", "part", "start", "end"}] of flagged excerpts, char offsets
    upstream_ms REAL, scoring_ms REAL,
    prompt TEXT, completion TEXT,  -- NULL unless the log was opened with store_text=True
    client_request_id TEXT  -- the client's own X-Request-Id, if it sent one (request_id is the guard's)
);
{_OPEN_STREAMS};
CREATE INDEX IF NOT EXISTS records_time ON records (time_unix);
CREATE INDEX IF NOT EXISTS records_request ON records (request_id);
"""


class AuditError(AtuError):
    """The audit log cannot be opened or written."""


class AuditFormatError(AuditError, FormatError):
    """The file is not an audit log this version can read (corrupt, another database, or a newer format)."""


class AuditClosedError(AuditError):
    """``append`` was called after ``close``."""


def _strip_text(obj: Any) -> Any:
    """A copy of a JSON-like value without the text-bearing keys, at any depth."""
    if isinstance(obj, dict):
        return {k: _strip_text(v) if isinstance(v, (dict, list)) else v for k, v in obj.items() if k not in _TEXT_KEYS}
    return [_strip_text(v) if isinstance(v, (dict, list)) else v for v in obj]


def _check_file(path: Path) -> None:
    if not path.parent.is_dir():
        raise AuditError(f"{path}: directory {path.parent} does not exist; create it or pass another audit path.")
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        if head != SQLITE_MAGIC:
            raise AuditFormatError(
                f"{path}: not an SQLite audit log (starts with {head[:8]!r}); pass a new path or the guard's log."
            )


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # in WAL mode: the WAL is fsynced at every commit
        _check_schema(conn, path)
    except sqlite3.DatabaseError as e:
        conn.close()
        raise AuditFormatError(f"{path}: unreadable SQLite database ({e}); pass a new path or the guard's log.") from e
    except BaseException:
        conn.close()
        raise
    return conn


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema in an empty database; refuse other databases and newer formats."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    tables.discard("sqlite_sequence")
    if not tables:
        conn.execute("BEGIN IMMEDIATE")
        for stmt in filter(str.strip, _SCHEMA.split(";")):
            conn.execute(stmt)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),))
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (iso_time(_time.time()),))
        conn.execute("COMMIT")
        return
    if "meta" not in tables or "records" not in tables:
        raise AuditFormatError(
            f"{path}: an SQLite database but not an atu audit log (tables {sorted(tables)}); pass another path."
        )
    row = conn.execute("SELECT value FROM meta WHERE key='format_version'").fetchone()
    try:
        version = int(row[0])
    except (TypeError, ValueError):
        raise AuditFormatError(f"{path}: audit log without a valid format_version (got {row!r}).") from None
    if version > FORMAT_VERSION:
        raise AuditFormatError(
            f"{path}: audit log format {version} is newer than this atu reads ({FORMAT_VERSION}); "
            "upgrade atu, or log to a new file."
        )
    conn.execute(_OPEN_STREAMS)  # a log written before streams were opened ahead of their first byte
    columns = {r[1] for r in conn.execute("PRAGMA table_info(records)")}
    if "client_request_id" not in columns:  # a log written before the column existed: add it, rows keep NULL
        conn.execute("ALTER TABLE records ADD COLUMN client_request_id TEXT")


def _unfinished_row(log: AuditLog, request_id, endpoint, model, policy, client_request_id, time) -> tuple:
    rec = AuditRecord(request_id=request_id, endpoint=endpoint, model=model, policy=policy, action="error",
                      stream=True, scores={"error": UNFINISHED}, time=time,
                      client_request_id=client_request_id)  # fmt: skip
    return log._row(rec)


def _row_to_record(row: sqlite3.Row) -> AuditRecord:
    d = dict(row)
    return AuditRecord(
        id=d["id"], time=d["time_unix"], request_id=d["request_id"], endpoint=d["endpoint"], model=d["model"],
        policy=d["policy"], action=d["action"], stream=bool(d["stream"]), flagged=json.loads(d["flagged"]),
        scores=json.loads(d["scores"]), max_score=d["max_score"], prompt_sha256=d["prompt_sha256"],
        completion_sha256=d["completion_sha256"], spans=json.loads(d["spans"]), upstream_ms=d["upstream_ms"],
        scoring_ms=d["scoring_ms"], prompt=d["prompt"], completion=d["completion"],
        client_request_id=d.get("client_request_id"),
    )  # fmt: skip


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
        _check_file(self.path)
        _create_private(self.path)
        self._conn = _connect(self.path)
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
        sql = f"INSERT INTO records ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
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


def iter_sqlite(path: str | Path, since: float | datetime | None = None) -> Iterator[AuditRecord]:
    """Records of an SQLite audit log in id order (a reader connection; safe while a writer is appending)."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"{path}: no such audit log file.")
    _check_file(path)
    conn = _connect(path)  # opened now, so a bad file fails here rather than at the first next()
    conn.row_factory = sqlite3.Row
    since_unix = since.timestamp() if isinstance(since, datetime) else since
    if since_unix is None:
        cur = conn.execute("SELECT * FROM records ORDER BY id")
    else:
        cur = conn.execute("SELECT * FROM records WHERE time_unix >= ? ORDER BY id", (float(since_unix),))
    return _rows(conn, cur)


def _rows(conn: sqlite3.Connection, cur: sqlite3.Cursor) -> Iterator[AuditRecord]:
    try:
        for row in cur:
            yield _row_to_record(row)
    finally:
        conn.close()


def iter_jsonl(path: str | Path) -> Iterator[AuditRecord]:
    """Records of a JSONL file: audit records (``AuditRecord.to_dict`` shape) or traffic lines."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}).") from None
            rec = AuditRecord.from_dict(data, where=f"{path}:{n}")
            rec.request_id = rec.request_id or f"{path.name}:{n}"  # traffic lines may carry no id: name the line
            yield rec


def read_records(path: str | Path) -> Iterator[AuditRecord]:
    """Records of an SQLite audit log or a JSONL file, told apart by the SQLite magic bytes, then the suffix."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"{path}: no such file; pass an audit log (.db) or a JSONL traffic file.")
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head == SQLITE_MAGIC:
        return iter_sqlite(path)
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json") or head.lstrip()[:1] in (b"{", b""):
        return iter_jsonl(path)
    raise AuditFormatError(
        f"{path}: neither an SQLite audit log nor JSONL (starts with {head[:8]!r}); "
        "pass the guard's log or a .jsonl traffic file with prompt and completion fields."
    )
