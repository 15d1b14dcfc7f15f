"""The audit log's file: the SQLite schema (and upgrading older logs to it), the checks that a file is such a log,
and reading records back from it or from a JSONL file, for ``atu audit``. ``serve.audit`` writes it.

``read_records`` reads a log, or a JSONL file of the same record shape, or a JSONL traffic file of
``{"prompt", "completion", "request_id"?, "time"?}`` lines.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from atu.errors import AtuError, FormatError
from serve.audit_record import AuditRecord, iso_time

FORMAT_VERSION = 1
ACTIONS = ("passed", "annotated", "blocked", "cut", "error")
SQLITE_MAGIC = b"SQLite format 3\x00"
COLUMNS = (
    "time_iso", "time_unix", "request_id", "endpoint", "model", "policy", "action", "stream", "flagged", "scores",
    "max_score", "prompt_sha256", "completion_sha256", "spans", "upstream_ms", "scoring_ms", "prompt", "completion",
    "client_request_id",
)  # fmt: skip
OPEN_STREAMS = """CREATE TABLE IF NOT EXISTS open_streams (  -- streams that sent a byte and have no record yet
    request_id TEXT PRIMARY KEY, time_unix REAL NOT NULL, endpoint TEXT NOT NULL, model TEXT NOT NULL,
    policy TEXT NOT NULL, client_request_id TEXT
)"""
SCHEMA = f"""
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
{OPEN_STREAMS};
CREATE INDEX IF NOT EXISTS records_time ON records (time_unix);
CREATE INDEX IF NOT EXISTS records_request ON records (request_id);
"""


class AuditError(AtuError):
    """The audit log cannot be opened or written."""


class AuditFormatError(AuditError, FormatError):
    """The file is not an audit log this version can read (corrupt, another database, or a newer format)."""


def check_file(path: Path) -> None:
    if not path.parent.is_dir():
        raise AuditError(f"{path}: directory {path.parent} does not exist; create it or pass another audit path.")
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        if head != SQLITE_MAGIC:
            raise AuditFormatError(
                f"{path}: not an SQLite audit log (starts with {head[:8]!r}); pass a new path or the guard's log."
            )


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # in WAL mode: the WAL is fsynced at every commit
        check_schema(conn, path)
    except sqlite3.DatabaseError as e:
        conn.close()
        raise AuditFormatError(f"{path}: unreadable SQLite database ({e}); pass a new path or the guard's log.") from e
    except BaseException:
        conn.close()
        raise
    return conn


def check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema in an empty database; refuse other databases and newer formats."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    tables.discard("sqlite_sequence")
    if not tables:
        conn.execute("BEGIN IMMEDIATE")
        for stmt in filter(str.strip, SCHEMA.split(";")):
            conn.execute(stmt)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),))
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (iso_time(time.time()),))
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
    conn.execute(OPEN_STREAMS)  # a log written before streams were opened ahead of their first byte
    columns = {r[1] for r in conn.execute("PRAGMA table_info(records)")}
    if "client_request_id" not in columns:  # a log written before the column existed: add it, rows keep NULL
        conn.execute("ALTER TABLE records ADD COLUMN client_request_id TEXT")


def row_to_record(row: sqlite3.Row) -> AuditRecord:
    d = dict(row)
    return AuditRecord(
        id=d["id"], time=d["time_unix"], request_id=d["request_id"], endpoint=d["endpoint"], model=d["model"],
        policy=d["policy"], action=d["action"], stream=bool(d["stream"]), flagged=json.loads(d["flagged"]),
        scores=json.loads(d["scores"]), max_score=d["max_score"], prompt_sha256=d["prompt_sha256"],
        completion_sha256=d["completion_sha256"], spans=json.loads(d["spans"]), upstream_ms=d["upstream_ms"],
        scoring_ms=d["scoring_ms"], prompt=d["prompt"], completion=d["completion"],
        client_request_id=d.get("client_request_id"),
    )  # fmt: skip


def iter_sqlite(path: str | Path, since: float | datetime | None = None) -> Iterator[AuditRecord]:
    """Records of an SQLite audit log in id order (a reader connection; safe while a writer is appending)."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"{path}: no such audit log file.")
    check_file(path)
    conn = connect(path)  # opened now, so a bad file fails here rather than at the first next()
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
            yield row_to_record(row)
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
