"""The guard part of `atu demo`: run `atu serve` on the export as a user would, ask it questions through the
OpenAI client, print the leakage annotations side by side, and shut everything down."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from atu.errors import AtuError


@dataclass
class Served:
    guard_url: str  # the guard's base URL (clients add /v1)
    vllm_url: str
    model_name: str
    output: list[str]  # what `atu serve` printed so far
    pid: int = 0  # the `atu serve` process (the guard runs in it; vLLM in a child of it)
    vllm_key: str | None = None  # the key of that vLLM (it answers only the guard and whoever holds the key)


@contextlib.contextmanager
def atu_serve(export_dir: Path, port: int, *args: str, start_timeout: float = 300.0) -> Iterator[Served]:
    """Run ``atu serve EXPORT --port PORT *args`` in a child process until it reports its endpoints; on exit send
    it Ctrl-C (SIGINT) and wait for it to stop vLLM and itself."""
    import secrets

    from atu import envs

    cmd = [sys.executable, "-m", "atu.cli", "serve", str(export_dir), "--port", str(port), *args]
    key = secrets.token_urlsafe(32)  # chosen here, so that this caller can reach vLLM as well as the guard
    env = envs.child_env({envs.ATU_VLLM_KEY: key})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:  # keep reading, so that a chatty vLLM never blocks on a full pipe
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C stops"):
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not ready.wait(start_timeout) or proc.poll() is not None:
            raise AtuError("atu serve did not start:\n" + "\n".join(lines[-20:]))
        vllm = next(re.match(r"vLLM:\s+(\S+)\s+\(model '(.*)'\)", ln) for ln in lines if ln.startswith("vLLM:"))
        served = Served(f"http://127.0.0.1:{port}", vllm.group(1), vllm.group(2), lines, proc.pid, key)
        _wait_healthy(served.guard_url, time.time() + 60)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(url: str, deadline: float) -> None:
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise AtuError(f"the guard at {url} did not become healthy")
        time.sleep(0.5)


def ask_through_guard(served: Served, questions: Sequence[tuple[str, str]], max_tokens: int = 24) -> list[dict]:
    """Ask each (about, question) through the guard with the OpenAI client; one row per question."""
    import openai

    client = openai.OpenAI(base_url=served.guard_url + "/v1", api_key="not-needed", max_retries=0)
    rows = []
    for about, question in questions:
        resp = client.chat.completions.create(
            model=served.model_name,
            messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        leak = resp.model_extra["leakage"]
        (report,) = leak["choices"]
        top = report["completion"][0] if report["completion"] else None
        prompt_top = report["prompt"][0] if report["prompt"] else None
        rows.append(
            {
                "about": about,
                "question": question,
                "answer": resp.choices[0].message.content,
                "action": leak["action"],
                "flagged": leak["flagged"],
                "prompt_flagged": leak["prompt_flagged"],
                "top_concept": top["concept"] if top else None,
                "top_score": top["score"] if top else None,
                "top_threshold": top["threshold"] if top else None,
                "prompt_top_concept": prompt_top["concept"] if prompt_top else None,
                "prompt_top_score": prompt_top["score"] if prompt_top else None,
            }
        )
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    out = [f"{'about':<10}{'question':<46}{'answer':<32}{'top concept (score/thr)':<34}{'prompt top':<26}flagged"]
    for r in rows:
        top = f"{r['top_concept']} ({r['top_score']:.2f}/{r['top_threshold']:.2f})" if r["top_concept"] else "-"
        ptop = f"{r['prompt_top_concept']} ({r['prompt_top_score']:.2f})" if r["prompt_top_concept"] else "-"
        flagged = ",".join(r["flagged"]) or "-"
        out.append(f"{r['about']:<10}{r['question'][:44]:<46}{r['answer'].strip()[:30]:<32}{top[:33]:<34}"
                   f"{ptop[:25]:<26}{flagged}")  # fmt: skip
    return "\n".join(out)
