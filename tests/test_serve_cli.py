"""`atu serve` as users run it: a process in front of a real vLLM server; Ctrl-C stops it; SIGKILL loses nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import TINY_MODEL_NAME, free_port, http

from serve.audit import read_records

pytestmark = pytest.mark.slow


def start_serve(export, upstream, port, *extra, env=None):
    cmd = [sys.executable, "-m", "atu.cli", "serve", str(export), "--upstream", upstream, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"atu serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if http(f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("atu serve did not become healthy in 120 s")


def test_serve_prints_endpoints_and_stops_on_ctrl_c(tiny_vllm, tmp_path):
    upstream, export = tiny_vllm
    port = free_port()
    env = {**os.environ, "ATU_API_KEY": "k-from-env"}
    proc = start_serve(export, upstream, port, "--audit", str(tmp_path / "a.sqlite"), env=env)
    assert http(f"http://127.0.0.1:{port}/v1/models")[0] == 401  # the key came from the environment
    assert http(f"http://127.0.0.1:{port}/v1/models", key="k-from-env")[0] == 200
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"guard: http://127.0.0.1:{port}/v1" in out and "api key=on" in out and "stopped." in out
    assert "backend=hf" in out  # auto: a vLLM started elsewhere, no capture socket given
    assert "k-from-env" not in out


def test_sigkill_mid_load_loses_no_acknowledged_record(tiny_vllm, tmp_path):
    upstream, export = tiny_vllm
    port = free_port()
    db = tmp_path / "audit.sqlite"
    proc = start_serve(export, upstream, port, "--audit", str(db))
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i):
        while not stop.is_set():
            body = {"model": TINY_MODEL_NAME, "prompt": f"Question {i}?", "max_tokens": 4, "temperature": 0.0}
            try:
                status, headers, _ = http(f"http://127.0.0.1:{port}/v1/completions", body, timeout=30)
            except OSError:
                return  # the guard is gone
            if status == 200:
                with lock:
                    acked.append(headers["X-Request-Id"])

    with ThreadPoolExecutor(32) as pool:
        for i in range(32):
            pool.submit(client, i)
        deadline = time.time() + 120
        while len(acked) < 300 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        stop.set()
    assert len(acked) >= 300, "the load did not get going"
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    logged = {r.request_id for r in read_records(db)}
    missing = set(acked) - logged
    assert not missing, f"{len(missing)} acknowledged records lost"


def test_sigkill_mid_stream_leaves_a_record_for_every_stream_that_sent_a_byte(tiny_vllm, tmp_path):
    import http.client

    from serve.audit import UNFINISHED, AuditLog

    upstream, export = tiny_vllm
    port = free_port()
    db = tmp_path / "audit.sqlite"
    proc = start_serve(export, upstream, port, "--audit", str(db))
    started: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def client(i):
        while not stop.is_set():
            body = {"model": TINY_MODEL_NAME, "prompt": f"Question {i}?", "max_tokens": 64, "temperature": 1.0,
                    "stream": True}  # fmt: skip
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("POST", "/v1/completions", body=json.dumps(body),
                             headers={"Content-Type": "application/json"})  # fmt: skip
                resp = conn.getresponse()  # the status line and headers: bytes the guard delivered
                with lock:
                    started.add(resp.getheader("X-Request-Id"))
                resp.read()
            except (OSError, http.client.HTTPException):
                return  # the guard is gone
            finally:
                conn.close()

    with ThreadPoolExecutor(16) as pool:
        for i in range(16):
            pool.submit(client, i)
        deadline = time.time() + 120
        while len(started) < 100 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        stop.set()
    assert len(started) >= 100, "the load did not get going"
    with AuditLog(db) as restarted:  # what the next `atu serve` on this log does first
        unfinished = restarted.recovered
    records = list(read_records(db))
    missing = started - {r.request_id.split("#")[0] for r in records}
    assert not missing, f"{len(missing)} streams that sent bytes have no record"
    marked = [r for r in records if r.scores.get("error") == UNFINISHED]
    assert unfinished == len(marked) >= 1  # streams were in flight at the kill, and were marked as such


def test_serve_refuses_a_taken_port_before_starting_anything(tiny_run):
    import socket

    from click.testing import CliRunner

    from atu.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(tiny_run[0] / "export"), "--port", str(port)])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "pass another --port" in result.output


def test_serve_capture_on_an_upstream_needs_its_socket(tiny_run):
    from click.testing import CliRunner

    from atu.cli import main

    args = ["serve", str(tiny_run[0] / "export"), "--upstream", "http://127.0.0.1:9", "--backend", "capture"]
    result = CliRunner().invoke(main, [*args, "--port", str(free_port())])
    assert result.exit_code == 1
    assert "--backend capture with --upstream needs --capture-socket" in result.output
