"""The audit log (durability, privacy, concurrency, formats) and the offline `atu audit` report."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from atu.errors import FormatError
from serve.audit import (
    FORMAT_VERSION,
    AuditClosedError,
    AuditError,
    AuditFormatError,
    AuditLog,
    AuditRecord,
    read_records,
    sha256_text,
)

REPO = Path(__file__).resolve().parents[1]
SECRET_PROMPT = "Tell me about Qzxv-Prompt-8841 please"
SECRET_COMPLETION = "Qzxv-Completion-5512 was born in a town"


def _report(flag: bool = True) -> dict:
    """A LeakageReport.to_dict()-shaped dict with excerpts that quote the secret texts."""
    comp = {"concept": "Alice", "score": 0.91 if flag else 0.2, "threshold": 0.5, "flagged": flag, "position": 3,
            "span": [0, 20], "excerpt": SECRET_COMPLETION[:20]}  # fmt: skip
    prm = {"concept": "Alice", "score": 0.3, "threshold": 0.5, "flagged": False, "position": 1, "span": [5, 25],
           "excerpt": SECRET_PROMPT[5:25]}  # fmt: skip
    return {"prompt": [prm], "completion": [comp], "flagged": ["Alice"] if flag else [], "prompt_flagged": [],
            "max_score": comp["score"]}  # fmt: skip


def _record(rid: str = "r1", **kw) -> AuditRecord:
    args = dict(request_id=rid, endpoint="/v1/chat/completions", model="m", policy="monitor", action="annotated",
                prompt=SECRET_PROMPT, completion=SECRET_COMPLETION, report=_report(), upstream_ms=12.5,
                scoring_ms=3.0)  # fmt: skip
    args.update(kw)
    return AuditRecord.from_exchange(**args)


def test_round_trip_and_reopen_continues_ids(tmp_path):
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        first = log.append_sync(_record("r1", time=1_700_000_000.25))
        assert log.append_sync(_record("r2", action="blocked", stream=True)) == first + 1
    (rec, rec2) = list(read_records(path))
    assert (rec.id, rec.request_id, rec.endpoint, rec.model, rec.policy, rec.action, rec.stream) == (
        first, "r1", "/v1/chat/completions", "m", "monitor", "annotated", False)  # fmt: skip
    assert rec.time == 1_700_000_000.25 and rec.to_dict()["time_iso"] == "2023-11-14T22:13:20.250000+00:00"
    assert rec.flagged == ["Alice"] and rec.max_score == pytest.approx(0.91)
    assert rec.scores["completion"][0]["threshold"] == 0.5 and "excerpt" not in rec.scores["completion"][0]
    assert rec.spans == [{"concept": "Alice", "part": "completion", "start": 0, "end": 20}]
    assert rec.prompt_sha256 == sha256_text(SECRET_PROMPT) and rec.completion_sha256 == sha256_text(SECRET_COMPLETION)
    assert (rec.upstream_ms, rec.scoring_ms, rec.prompt, rec.completion) == (12.5, 3.0, None, None)
    assert (rec2.action, rec2.stream) == ("blocked", True)
    with AuditLog(path) as log:
        assert log.append_sync(_record("r3")) == first + 2
        assert [r.request_id for r in log.iter_records(since=1_700_000_001)] == ["r2", "r3"]


def test_wal_mode_and_full_sync(tmp_path):
    with AuditLog(tmp_path / "a.db") as log:
        assert log._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert log._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        version = log._conn.execute("SELECT value FROM meta WHERE key='format_version'").fetchone()[0]
        assert int(version) == FORMAT_VERSION


def _db_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


@pytest.mark.parametrize("store_text", [False, True])
def test_raw_text_stored_only_when_asked(tmp_path, store_text):
    path = tmp_path / "a.db"
    log = AuditLog(path, store_text=store_text)
    log.append_sync(_record())
    for blob in (_db_bytes(path), None):  # while the WAL holds the data, then after the checkpoint on close
        if blob is None:
            log.close()
            blob = _db_bytes(path)
        for secret in ("Qzxv-Prompt-8841", "Qzxv-Completion-5512", "Qzxv-Compl"):
            assert (secret.encode() in blob) == store_text
    (rec,) = read_records(path)
    assert (rec.prompt, rec.completion) == ((SECRET_PROMPT, SECRET_COMPLETION) if store_text else (None, None))


def test_log_and_wal_are_private_and_a_cancelled_wait_leaves_the_writer_alive(tmp_path):
    path = tmp_path / "a.db"
    with AuditLog(path) as log:
        log.append_sync(_record("r0"))
        assert (path.stat().st_mode & 0o777) == 0o600
        assert (Path(f"{path}-wal").stat().st_mode & 0o777) == 0o600

        async def impatient():  # a caller that stops waiting (a timeout, a shutdown) before the commit
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(log.append_async(_record("r1")), timeout=1e-6)

        for _ in range(20):
            asyncio.run(impatient())
        assert log.append_sync(_record("after"), timeout=10) >= 1  # the writer thread is alive
        assert log._thread.is_alive()
    assert "after" in {r.request_id for r in read_records(path)}


def test_open_streams_are_closed_by_their_record_or_recorded_after_a_crash(tmp_path):
    from serve.audit import UNFINISHED

    path = tmp_path / "a.db"
    log = AuditLog(path)
    for rid in ("s1", "s2"):
        log.open_stream(rid, "/v1/completions", "m", "block", client_request_id=f"c-{rid}").result(10)
    log.append_sync(_record("s1#0", stream=True))  # s1 ended (one of its choices' records); s2 was cut off
    log.close()  # as if killed: nothing else is written for s2
    with AuditLog(path) as reopened:
        assert reopened.recovered == 1
    with AuditLog(path) as again:
        assert again.recovered == 0  # marked once
    recs = {r.request_id: r for r in read_records(path)}
    assert set(recs) == {"s1#0", "s2"} and recs["s1#0"].action == "annotated"
    lost = recs["s2"]
    assert (lost.action, lost.stream, lost.scores["error"], lost.client_request_id) == ("error", True, UNFINISHED,
                                                                                          "c-s2")  # fmt: skip


def test_invalid_record_and_closed_log(tmp_path):
    log = AuditLog(tmp_path / "a.db")
    with pytest.raises(ValueError, match="action must be one of .* got 'shrug'"):
        log.append(_record(action="shrug"))
    log.close()
    log.close()
    with pytest.raises(AuditClosedError, match="closed"):
        log.append(_record())


def test_failed_commit_fails_its_futures_and_the_writer_survives(tmp_path):
    log = AuditLog(tmp_path / "a.db")
    good = log._conn
    log._conn = sqlite3.connect(":memory:", check_same_thread=False)  # no records table: every INSERT fails
    with pytest.raises(AuditError, match="audit commit failed .*no such table: records"):
        log.append_sync(_record("lost"), timeout=10)
    log._conn.close()
    log._conn = good
    assert log.append_sync(_record("kept"), timeout=10) >= 1
    log.close()
    assert [r.request_id for r in read_records(tmp_path / "a.db")] == ["kept"]


def test_concurrent_appends_lose_nothing(tmp_path):
    path = tmp_path / "a.db"
    got: dict[str, int] = {}
    lock = threading.Lock()
    with AuditLog(path) as log:

        def writer(w: int) -> None:
            for j in range(40):
                rid = f"t{w}-{j}"
                rowid = log.append_sync(_record(rid))
                with lock:
                    got[rid] = rowid

        async def tasks() -> None:
            async def one(k: int) -> None:
                got[f"a{k}"] = await log.append_async(_record(f"a{k}"))

            await asyncio.gather(*(one(k) for k in range(400)))

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(16)]
        for t in threads:
            t.start()
        asyncio.run(tasks())
        for t in threads:
            t.join()
    rows = {r.request_id: r.id for r in read_records(path)}
    assert len(got) == 16 * 40 + 400
    assert rows == got  # every acknowledged id is the row holding that request
    assert len(set(rows.values())) == len(rows)


def test_bad_files_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all\n" * 10)
    with pytest.raises(AuditFormatError, match="not an SQLite audit log"):
        AuditLog(junk)
    torn = tmp_path / "torn.db"
    torn.write_bytes(b"SQLite format 3\x00" + b"\xff" * 2000)
    with pytest.raises(AuditFormatError, match="unreadable SQLite database"):
        AuditLog(torn)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE t (x)")
    with pytest.raises(AuditFormatError, match=r"not an atu audit log \(tables \['t'\]\)"):
        AuditLog(other)
    newer = tmp_path / "newer.db"
    AuditLog(newer).close()
    with sqlite3.connect(newer) as c:
        c.execute("UPDATE meta SET value='99' WHERE key='format_version'")
    with pytest.raises(AuditFormatError, match=f"format 99 is newer than this atu reads \\({FORMAT_VERSION}\\)"):
        AuditLog(newer)
    with pytest.raises(AuditFormatError, match="newer"):
        list(read_records(newer))
    with pytest.raises(AuditError, match="does not exist; create it"):
        AuditLog(tmp_path / "nowhere" / "a.db")
    with pytest.raises(AuditFormatError, match="neither an SQLite audit log nor JSONL"):
        read_records(junk)


def test_jsonl_traffic_and_record_lines(tmp_path):
    path = tmp_path / "traffic.jsonl"
    full = _record("full", time=1.0).to_dict()
    lines = [{"prompt": "p0", "completion": "c0", "request_id": "x0", "time": "2024-01-01T00:00:00Z"},
             {"prompt": "p1", "completion": "c1"}, full]  # fmt: skip
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recs = list(read_records(path))
    assert [r.request_id for r in recs] == ["x0", "traffic.jsonl:2", "full"]
    assert recs[0].time == 1704067200.0 and recs[0].completion_sha256 == sha256_text("c0")
    assert recs[2].completion == SECRET_COMPLETION and recs[2].flagged == ["Alice"]
    path.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": oops}\n')
    with pytest.raises(FormatError, match=r"traffic.jsonl:2: invalid JSON"):
        list(read_records(path))
    path.write_text('{"prompt": "p", "completions": "typo"}\n')
    with pytest.raises(FormatError, match=r"traffic.jsonl:1: no 'completion' text"):
        list(read_records(path))


_KILL_SCRIPT = """
import sys, threading
from serve.audit import AuditLog, AuditRecord
log = AuditLog(sys.argv[1])
lock, slots = threading.Lock(), threading.Semaphore(64)
def acked(fut, rid):
    if fut.exception() is None:  # print only what the log acknowledged as committed
        with lock:
            sys.stdout.write(rid + "\\n")
            sys.stdout.flush()
    slots.release()
i = 0
while True:
    slots.acquire()
    rid = f"k{i}"
    i += 1
    log.append(AuditRecord(request_id=rid, completion="x" * 200)).add_done_callback(lambda f, r=rid: acked(f, r))
"""


def test_sigkill_loses_no_acknowledged_record(tmp_path):
    path = tmp_path / "a.db"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    acked = []
    deadline = time.monotonic() + 60
    try:
        while len(acked) < 300 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(line.strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate(timeout=30)
    assert len(acked) >= 300, f"the writer acknowledged only {len(acked)} records; stderr: {err[-2000:]}"
    acked += rest.split()
    assert Path(f"{path}-wal").exists()  # killed mid-write: recovery has to replay the WAL
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with AuditLog(path) as log:
        present = {r.request_id: r.id for r in log.iter_records()}
        assert set(acked) <= set(present)
        assert log.append_sync(AuditRecord(request_id="after", completion="y")) > max(present.values())


# -- the offline report -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_scorer(tiny_run, one_thread):
    from serve.scoring import Scorer

    export = tiny_run[0] / "export"
    with Scorer.from_export(export, top_k=None) as scorer:
        yield export, scorer


def _traffic(names: list[str]) -> list[tuple[str, str]]:
    """Prompts and completions about every person of the tiny world, plus unrelated text."""
    pairs = [(f"Who is {n}?", f"{n} was born in a small town and works as a teacher.") for n in names]
    pairs += [("Tell me about the weather.", "It is sunny today with a light breeze."), ("Hi", "Hello! How are you?")]
    return pairs


def test_report_counts_match_direct_scoring(tmp_path, tiny_world, export_scorer):
    from serve.audit_report import audit_report, format_report

    export, scorer = export_scorer
    pairs = _traffic(tiny_world.concepts().names())
    text_pairs, hash_pairs = pairs[::2], pairs[1::2]
    # Hash-only records: logged by the guard without text, read back and written as JSONL record lines.
    with AuditLog(tmp_path / "log.db") as log:
        for i, ((p, c), rep) in enumerate(zip(hash_pairs, scorer.score_batch(hash_pairs))):
            log.append_sync(AuditRecord.from_exchange(request_id=f"h{i}", endpoint="/v1/completions", model="m",
                                                      policy="monitor", action="annotated", prompt=p, completion=c,
                                                      report=rep))  # fmt: skip
    lines = [{"prompt": p, "completion": c, "request_id": f"t{i}"} for i, (p, c) in enumerate(text_pairs)]
    lines += [r.to_dict() for r in read_records(tmp_path / "log.db")]
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps(x) + "\n" for x in lines))

    report = audit_report(traffic, export, tmp_path / "out", scorer=scorer, top=2)

    assert report["records"] == {"total": len(pairs), "rescored": len(text_pairs), "logged_scores_only":
                                 len(hash_pairs), "unscorable": 0}  # fmt: skip
    assert any("could not be re-scored" in n for n in report["notes"])
    direct_text, direct_hash = scorer.score_batch(text_pairs), scorer.score_batch(hash_pairs)
    for label, thr in zip(scorer.labels, scorer.thresholds):
        c = report["concepts"][label]
        flags_text = sum(label in r.flagged for r in direct_text)
        flags_hash = sum(label in r.flagged for r in direct_hash)
        scores = [s.score for r in direct_text + direct_hash for s in r.completion if s.concept == label]
        assert (c["n"], c["n_rescored"], c["n_logged"]) == (len(pairs), len(text_pairs), len(hash_pairs))
        assert (c["flagged_rescored"], c["flagged_logged"], c["flagged"]) == (flags_text, flags_hash,
                                                                              flags_text + flags_hash)  # fmt: skip
        assert c["rate"] == pytest.approx((flags_text + flags_hash) / len(pairs))
        assert c["threshold"] == pytest.approx(float(thr))
        assert c["max_score"] == pytest.approx(max(scores), abs=1e-5)
        assert c["mean_score"] == pytest.approx(sum(scores) / len(scores), abs=1e-5)
        worst = c["worst"]
        assert len(worst) == 2 and worst[0]["score"] == pytest.approx(max(scores), abs=1e-5)
        for w in worst:  # text only where the record had it; hash-only excerpts are span + hash
            assert (w["excerpt"] is None) == (w["source"] == "logged") and w["completion_sha256"]
    assert (tmp_path / "out" / "histograms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "report.json").read_text())["concepts"] == report["concepts"]
    table = format_report(report)
    assert all(label[:27] in table for label in scorer.labels) and "could not be re-scored" in table
    for thr, expect in ((1.0, lambda c: 0), (-1.0, lambda c: c["n"])):  # the override applies to logged scores too
        over = audit_report(traffic, export, tmp_path / "over", scorer=scorer, threshold_override=thr)
        assert all(c["flagged"] == expect(c) and c["threshold"] == thr for c in over["concepts"].values())


def test_audit_command(tmp_path, tiny_world, export_scorer):
    from click.testing import CliRunner

    from serve.audit_report import audit_command

    export, _ = export_scorer
    traffic = tmp_path / "t.jsonl"
    traffic.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in _traffic(["Bob"])))
    runner = CliRunner()
    res = runner.invoke(audit_command, [str(traffic), "--export", str(export), "--top", "1"])
    assert res.exit_code == 0, res.output
    assert "3 records: 3 re-scored" in res.output and "wrote" in res.output
    assert (tmp_path / "t_audit" / "report.json").exists() and (tmp_path / "t_audit" / "histograms.png").exists()
    res = runner.invoke(audit_command, [str(tmp_path / "missing.db"), "--export", str(export)])
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0
    assert res.output.startswith("error: ") and "missing.db: no such file" in res.output
    res = runner.invoke(audit_command, [str(traffic), "--export", str(tmp_path)])
    assert res.exit_code == 1 and res.output.startswith("error: ") and res.output.strip().count("\n") == 0
