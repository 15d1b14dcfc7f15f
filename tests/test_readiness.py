"""Liveness and readiness of the guard, against a stand-in vLLM whose /health can be switched (no model needed)."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from serve_helpers import http

from serve.app import Guard
from serve.backends import CaptureBackend, StateBackend
from serve.launch import guard_in_thread
from serve.settings import GuardSettings


class FakeVLLM:
    """An HTTP server answering GET /health with ``self.status``."""

    def __init__(self) -> None:
        fake = self
        self.status = 200

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                self.send_response(fake.status if self.path == "/health" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeCapture:
    path = "/run/atu/capture.sock"
    answers = True

    def ping(self) -> bool:
        return self.answers


def stub_scorer(capture=None):
    """What the guard asks of a scorer; with ``capture``, that of one reading states captured in vLLM."""
    backend = CaptureBackend(capture, fallback=None) if capture is not None else StateBackend()
    return SimpleNamespace(
        uses_captures=backend.uses_captures,
        capture_status=backend.capture_status,
        count_captures=lambda listener: None,
        score_batch=lambda pairs, captures=None, since=None: [],
    )


@pytest.fixture
def vllm():
    server = FakeVLLM()
    yield server
    server.close()


def test_live_and_ready_differ_when_vllm_is_down(vllm):
    settings = GuardSettings(upstream_url=vllm.url, port=0, api_key="secret", connect_timeout=1.0)
    with guard_in_thread(Guard(settings, stub_scorer(), tokenizer=None)) as base:
        assert http(base + "/live") == (200, http(base + "/live")[1], {"status": "ok"})
        status, _, body = http(base + "/ready")
        assert status == 200 and body == {"policy": "monitor", "status": "ok", "upstream": "ok"}
        assert http(base + "/health")[0] == 200  # the older name of /ready
        vllm.status = 503
        status, _, body = http(base + "/ready")
        assert status == 503 and body["status"] == "degraded" and body["upstream"] == "status 503"
        assert http(base + "/live")[0] == 200  # not a reason to restart the guard
        assert http(base + "/v1/models")[0] == 401  # the probes need no key; everything else does
        assert http(base + "/metrics")[0] == 403  # the operator view is off without an operator key


def test_ready_waits_for_the_capture_plugin(vllm):
    capture = FakeCapture()
    settings = GuardSettings(upstream_url=vllm.url, port=0)
    with guard_in_thread(Guard(settings, stub_scorer(capture), tokenizer=None)) as base:
        status, _, body = http(base + "/ready")
        assert status == 200 and body["capture"] == "ok"
        capture.answers = False
        status, _, body = http(base + "/ready")
        assert status == 503 and body["capture"] == "no answer on /run/atu/capture.sock"
        assert http(base + "/live")[0] == 200
