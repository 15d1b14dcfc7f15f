"""Start the pieces of `atu serve`: the vLLM server on the export, the scorer, the audit log, the guard proxy.

``serve_stack`` is what the CLI runs; ``guard_in_thread`` runs a guard inside this process (for embedding and tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
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
    # Hidden states for scoring: "capture" (recorded by the plugin inside the vLLM that generates), "hf"
    # (transformers re-runs layers 0..L), "vllm" (a pooling runner on a probe export), or "auto": capture when
    # vLLM is started here or capture_socket is given, else hf.
    backend: str = "auto"
    pooling_url: str | None = None  # backend "vllm": an already running pooling server; None: start one
    device: str = "cpu"  # backend "hf" (and capture's fallback): torch device
    capture_socket: str | None = None  # backend "capture" with --upstream: the socket of that vLLM's plugin
    vllm_args: tuple[str, ...] = ()  # given to the vLLM started here unchanged, after atu's own (`atu serve E -- ...`)
    vllm_device: str = "auto"  # the vLLM started here: cuda (vLLM's defaults), cpu (the CPU settings), auto

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "capture" if self.upstream_url is None or self.capture_socket else "hf"


@dataclass
class Upstreams:
    """What `atu serve` talks to."""

    url: str  # the vLLM OpenAI server
    model_name: str
    backend: str  # resolved: hf, vllm or capture
    pooling_url: str | None = None  # backend vllm
    capture_socket: str | None = None  # backend capture
    key: str | None = None  # the key of the vLLM started here (None: a vLLM started elsewhere)


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
    export_dir: Path,
    settings: GuardSettings,
    backend: str = "hf",
    device: str = "cpu",
    pooling_url: str | None = None,
    capture_socket: str | None = None,
) -> Guard:
    """Load the export's scorer, tokenizer and (when configured) audit log into a Guard."""
    from serve.audit import AuditLog
    from serve.scoring import Scorer

    scorer = Scorer.from_export(
        export_dir,
        backend=backend,
        device=device,
        pooling_url=pooling_url,
        capture_socket=capture_socket,
        match_names=settings.match_names,
    )
    audit = AuditLog(settings.audit_path, store_text=settings.audit_store_text) if settings.audit_path else None
    return Guard(settings, scorer, scorer.tokenizer, audit=audit)  # the export's tokenizer, loaded once


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


def capture_vllm(
    export_dir: Path, socket_path: str, hook_layer: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """(extra vLLM arguments, environment) that start a vLLM server on ``export_dir`` with the capture plugin on
    (see ``serve.capture``), recording the export's hook layer (read from the export unless given) and answering on
    ``socket_path``."""
    from atu import envs

    if hook_layer is None:
        from atu.export import load_export

        hook_layer = load_export(export_dir).guard.hook_layer
    env = {envs.ATU_CAPTURE_LAYER: str(hook_layer), envs.ATU_CAPTURE_SOCKET: socket_path}
    # A prompt token served from vLLM's prefix cache is never computed, so the plugin would have no row for it. The
    # plugin records through a forward hook, which a replayed CUDA graph or a compiled graph never calls: eager mode.
    return list(CAPTURE_ARGS), env


CAPTURE_ARGS = ("--no-enable-prefix-caching", "--enforce-eager")
# VLLM_ARGS that would silently stop the capture plugin from recording every token.
_CAPTURE_CONFLICTS = ("--enable-prefix-caching", "--no-enforce-eager", "--compilation-config", "-O", "-cc")


def served_model_name(vllm_args: tuple[str, ...] | list[str], default: str) -> str:
    """The (first) name given by ``--served-model-name`` in ``vllm_args`` (vLLM keeps the last occurrence of an
    option), else ``default``: the guard must send the name vLLM serves."""
    name = default
    for i, arg in enumerate(vllm_args):
        if arg == "--served-model-name" and i + 1 < len(vllm_args):
            name = vllm_args[i + 1]
        elif arg.startswith("--served-model-name="):
            name = arg.split("=", 1)[1]
    return name


def check_capture_args(vllm_args: tuple[str, ...] | list[str]) -> None:
    for arg in vllm_args:
        if arg.split("=", 1)[0] in _CAPTURE_CONFLICTS or any(arg.startswith(c) for c in ("-O", "-cc")):
            raise AtuError(
                f"vLLM argument {arg!r} conflicts with the capture backend (it needs every prompt token computed, "
                "in eager mode); drop it, or choose --backend hf"
            )


@contextlib.contextmanager
def upstream_servers(opts: ServeOptions) -> Iterator[Upstreams]:
    """Start (or reuse) vLLM, with the capture plugin on for the capture backend, and, for the vLLM backend, the
    pooling server. An export whose files do not match its manifest's hashes is refused before vLLM loads any of
    them (and the scorer checks them again once vLLM has loaded)."""
    from atu.vllm_check import vllm_server

    export_dir = Path(opts.export_dir)
    model_name = served_model_name(opts.vllm_args, opts.model_name or export_dir.resolve().name)
    backend = opts.resolved_backend()
    if opts.vllm_args and opts.upstream_url is not None:
        raise AtuError("vLLM arguments after -- are for the vLLM that atu serve starts; with --upstream, give them "
                       "to your own vLLM")  # fmt: skip
    with contextlib.ExitStack() as stack:
        up = Upstreams(opts.upstream_url or "", model_name, backend, opts.pooling_url, opts.capture_socket)
        if opts.upstream_url is None:
            from atu import envs
            from atu.export import load_export

            export = load_export(export_dir)  # the hashes, before vLLM reads model/
            # vLLM answers only the guard: a local process without the key cannot go around it
            up.key = envs.vllm_key()
            args, env = ["--served-model-name", model_name], {envs.VLLM_API_KEY: up.key}
            if backend == "capture":
                check_capture_args(opts.vllm_args)
                up.capture_socket = str(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "capture.sock")
                capture_args, capture_env = capture_vllm(export_dir, up.capture_socket, export.guard.hook_layer)
                args, env = args + capture_args, {**env, **capture_env}
            up.url = stack.enter_context(
                vllm_server(
                    export_dir / "model",
                    port=opts.vllm_port,
                    extra_args=args,
                    env=env,
                    device=opts.vllm_device,
                    user_args=opts.vllm_args,
                )  # fmt: skip
            )
        elif backend == "capture" and not up.capture_socket:
            raise AtuError(
                "--backend capture with --upstream needs --capture-socket: the ATU_CAPTURE_SOCKET of that vLLM "
                "(started with ATU_CAPTURE_LAYER and ATU_CAPTURE_SOCKET set, --no-enable-prefix-caching and "
                "--enforce-eager; see the README's recipe)."
            )
        if backend == "vllm" and up.pooling_url is None:
            from serve.pooling_model import pooling_server, probe_export

            up.pooling_url = stack.enter_context(pooling_server(probe_export(export_dir)))
        yield up


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
