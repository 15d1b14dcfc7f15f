"""Start the pieces of `atu serve`: the vLLM server on the export, the scorer, the audit log, the guard proxy.

``serve_stack`` is what the CLI runs; ``guard_in_thread`` runs a guard inside this process (for embedding and tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from atu.errors import AtuError
from serve.app import Guard, build_app
from serve.settings import GuardSettings

logger = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """What `atu serve` needs besides the guard settings."""

    export_dir: Path
    upstream_url: str | None = None  # an already running vLLM server; None: start one on the export
    vllm_port: int | None = None  # where to start vLLM (None: a free port)
    model_name: str | None = None  # the name clients use; None: the export directory's name
    backend: str = "hf"  # hidden states for scoring: "hf" (transformers) or "vllm" (pooling runner on a probe)
    pooling_url: str | None = None  # backend "vllm": an already running pooling server; None: start one
    device: str = "cpu"  # backend "hf": torch device


def check_port_free(host: str, port: int) -> None:
    """Fail before anything starts (vLLM takes a minute) when the guard's port is taken."""
    import socket

    if port == 0:
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise AtuError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port") from None


def make_guard(
    export_dir: Path, settings: GuardSettings, backend: str = "hf", device: str = "cpu", pooling_url: str | None = None
) -> Guard:
    """Load the export's scorer, tokenizer and (when configured) audit log into a Guard."""
    from transformers import AutoTokenizer

    from serve.audit import AuditLog
    from serve.scoring import Scorer

    scorer = Scorer.from_export(export_dir, backend=backend, device=device, pooling_url=pooling_url)
    tokenizer = AutoTokenizer.from_pretrained(Path(export_dir) / "model")
    audit = AuditLog(settings.audit_path, store_text=settings.audit_store_text) if settings.audit_path else None
    return Guard(settings, scorer, tokenizer, audit=audit)


def close_guard(guard: Guard) -> None:
    if guard.audit is not None:
        guard.audit.close()
    close = getattr(guard.scorer, "close", None)
    if close is not None:
        close()


@contextlib.contextmanager
def guard_in_thread(guard: Guard) -> Iterator[str]:
    """Run ``guard`` on its own event loop in a daemon thread; yields its base URL; stops it on exit."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict = {}

    async def start() -> None:
        runner = web.AppRunner(build_app(guard), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, guard.settings.host, guard.settings.port)
        await site.start()
        state["runner"] = runner
        state["port"] = runner.addresses[0][1]

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as e:  # reported to the caller below
            state["error"] = e
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=main, name="atu-guard", daemon=True)
    thread.start()
    started.wait()
    if "error" in state:
        raise AtuError(f"the guard could not start on {guard.settings.host}:{guard.settings.port}: {state['error']}")
    try:
        yield f"http://{guard.settings.host}:{state['port']}"
    finally:
        asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@contextlib.contextmanager
def upstream_servers(opts: ServeOptions) -> Iterator[tuple[str, str, str | None]]:
    """Start (or reuse) vLLM and, for the vLLM backend, the pooling server; yields (upstream, model, pooling)."""
    from atu.vllm_check import vllm_server

    export_dir = Path(opts.export_dir)
    model_name = opts.model_name or export_dir.resolve().name
    with contextlib.ExitStack() as stack:
        upstream = opts.upstream_url
        if upstream is None:
            args = ["--served-model-name", model_name]
            upstream = stack.enter_context(vllm_server(export_dir / "model", port=opts.vllm_port, extra_args=args))
        pooling = opts.pooling_url
        if opts.backend == "vllm" and pooling is None:
            from serve.probe import pooling_server, probe_export

            pooling = stack.enter_context(pooling_server(probe_export(export_dir)))
        yield upstream, model_name, pooling


def run_forever(guard: Guard) -> None:
    """Serve until SIGINT/SIGTERM (aiohttp's run_app handles both), then close the guard's resources."""
    try:
        web.run_app(
            build_app(guard),
            host=guard.settings.host,
            port=guard.settings.port,
            print=None,
            access_log=logging.getLogger("serve.access"),
            handle_signals=True,
        )
    finally:
        close_guard(guard)
