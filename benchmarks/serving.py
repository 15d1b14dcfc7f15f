"""Serving throughput, latency and CPU cost: bare vLLM against vLLM behind the guard, one server, one run.

What it measures, for each guard policy (``monitor``, ``block``), each concurrency level (1, 8, 32, 64) and each
kind of request:

- streamed: vLLM's own serving benchmark (``vllm.benchmarks.serve``, run as a library), a closed loop of N
  concurrent streaming clients with random prompts of fixed length and a fixed output length (``--ignore-eos``);
- non-streamed: a small closed loop of N threads sending non-streamed /v1/completions requests (random token-id
  prompts of the same length), its output tokens counted from each answer's ``usage``.

At each level bare and guarded passes alternate in pairs (``--pairs``, 5 by default; bare first in one pair,
guarded first in the next, so that a drift of the machine during a pair falls on both sides) against the same vLLM
server. One pass per level is noisier than the gap it is meant to measure, so the figure is the median of the
per-pair guarded/bare output-throughput ratios, shown with their min, max and interquartile range; where the pair
ratios span more than the gap to a target (0.97x at 1 client, 0.95x at 32 in monitor mode, 0.90x at 32 under
block) a note says that the run cannot settle that target.

Beside throughput, the CPU time (user + system) of the guard process and of the vLLM server (with its children)
over each pass, divided by the requests it completed: what the guard costs per request next to what generating
costs. Beside those, what the guard did with each guarded pass's requests, read from its audit log: the share it
blocked or cut. The random prompts' completions can cross the export's thresholds (they are calibrated on the
world's own texts, not on random tokens); under ``block`` every such stream is cut and delivers fewer tokens, so
the output-throughput ratio then mixes the guard's cost with its decisions, and the table says how much. Last, the
latency the guard adds to a single non-streamed request, one at a time, bare and guarded alternating (median of the
paired differences).

    python benchmarks/serving.py                   # the export of `make demo` (demo_out/export)
    python benchmarks/serving.py --quick           # smoke run: few prompts, 2 pairs, levels 1 and 8
    python benchmarks/serving.py --export DIR --out DIR --pairs 9 --concurrency 1 32

Writes serving.json (every pass) and serving.md (the table) under --out (default results/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "bench"
POLICIES = ("monitor", "block")
# Not a guard policy: a pass-through proxy (benchmarks/relay_floor.py) where the guard goes, the cost of the hop alone.
RELAY = "relay"
RELAY_NOTE = (
    f"{RELAY}: not the guard but a pass-through proxy in its place (benchmarks/relay_floor.py: the same aiohttp "
    "stack, bytes copied as they arrive, no parsing, scoring or audit). Its ratio is what the hop alone costs on this "
    "machine, the ceiling of any guard in front of this vLLM."
)
MODES = ("streamed", "non-streamed")
# The guarded/bare output-throughput ratios the guard is meant to reach, by (policy, concurrency).
TARGETS = {("monitor", 1): 0.97, ("block", 1): 0.97, ("monitor", 32): 0.95, ("block", 32): 0.90}


# ---- pure helpers: the pair statistics, the spread note, the table ----


def quartiles(values: list[float]) -> tuple[float, float]:
    """(first, third) quartile of ``values``; both the value itself for a single one."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def pair_stats(ratios: list[float]) -> dict:
    """Median, min, max, quartiles and spread (max - min) of the per-pair guarded/bare ratios."""
    q1, q3 = quartiles(ratios)
    return {
        "n": len(ratios),
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "spread": max(ratios) - min(ratios),
    }


def spread_note(policy: str, mode: str, concurrency: int, stats: dict) -> str | None:
    """A plain note when the pair ratios at a level with a target spread wider than the gap between 1.00x and that
    target: the noise is then as large as what is measured, and the median may land on either side of the target by
    chance. Says so too when every pair fell on one side of it anyway. None when there is no target or the spread
    is narrower."""
    target = TARGETS.get((policy, concurrency))
    if target is None or stats["spread"] <= 1.0 - target:
        return None
    side = ""
    if stats["max"] < target:
        side = " (every pair fell below it, though)"
    elif stats["min"] >= target:
        side = " (every pair reached it, though)"
    return (
        f"{policy}, {mode}, concurrency {concurrency}: the {stats['n']} pair ratios span {stats['min']:.2f}x to "
        f"{stats['max']:.2f}x ({stats['spread']:.2f} wide), wider than the {1.0 - target:.2f} between 1.00x and the "
        f"{target:.2f}x target: this median cannot settle whether the guard meets it{side}."
    )


def markdown(res: dict) -> str:
    """The results as markdown: one row per policy, kind of request and level, then the notes and the latency."""
    lines = [
        f"# Serving: bare vLLM vs guarded (backend {res['backend']}), {res['machine']}",
        "",
        f"Export: `{res['export']}`; random prompts of {res['input_len']} tokens, {res['output_len']} output tokens; "
        f"{res['pairs']} bare/guarded pairs per level, alternating, one vLLM server. tok/s: median output tokens/s "
        "of the passes; ratio: median of the per-pair guarded/bare ratios (min, max, IQR of those ratios). CPU: "
        "user+system ms per completed request, over each pass (median of the passes)."
        + (f" Guard options: `{res['guard_args']}`." if res.get("guard_args") else ""),
        "",
        "| policy | requests | concurrency | bare tok/s | guarded tok/s | guarded/bare | min | max | IQR | target "
        "| guard CPU ms/req | vLLM CPU ms/req bare | vLLM CPU ms/req guarded | failed | blocked or cut |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        s, target = row["ratio"], TARGETS.get((row["policy"], row["concurrency"]))
        lines.append(
            f"| {row['policy']} | {row['mode']} | {row['concurrency']} | {row['bare_tok_s']:.0f} "
            f"| {row['guarded_tok_s']:.0f} | **{s['median']:.2f}x** | {s['min']:.2f} | {s['max']:.2f} "
            f"| {s['iqr']:.2f} | {f'{target:.2f}x' if target else '-'} | {row['guard_cpu_ms']:.1f} "
            f"| {row['vllm_cpu_ms_bare']:.1f} | {row['vllm_cpu_ms_guarded']:.1f} | {row['failed']} "
            f"| {_share(row.get('stopped'))} |"
        )
    notes = [note for row in res["rows"] for note in (row["note"], row.get("stopped_note")) if note]
    if any(row["policy"] == RELAY for row in res["rows"]):
        notes.insert(0, RELAY_NOTE)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    for policy, s in res["single"].items():
        if s is None:
            continue
        lines += [
            "",
            f"{policy}: non-streamed {s['max_tokens']}-token completion, one at a time ({s['n']} each): p50 bare "
            f"{s['bare_p50_ms']:.1f} ms, guarded {s['guarded_p50_ms']:.1f} ms; added (median of the paired "
            f"differences, requests alternating) **{s['added_paired_p50_ms']:.1f} ms**.",
        ]
    return "\n".join(lines) + "\n"


def level_row(policy: str, mode: str, concurrency: int, pairs: list[dict]) -> dict:
    """One table row from the pairs of one level: the ratio statistics, median throughput and CPU per request."""

    def median(target: str, key: Callable[[dict], float]) -> float:
        return statistics.median(key(pair[target]) for pair in pairs)

    stats = pair_stats([pair["ratio"] for pair in pairs])
    shares = [stopped_share(pair["guarded"].get("actions")) for pair in pairs]
    stopped = statistics.median(shares) if None not in shares else None
    return {
        "policy": policy,
        "mode": mode,
        "concurrency": concurrency,
        "ratio": stats,
        "bare_tok_s": median("bare", lambda r: r["output_throughput"]),
        "guarded_tok_s": median("guarded", lambda r: r["output_throughput"]),
        "guard_cpu_ms": median("guarded", lambda r: r["cpu_ms_per_request"]["guard"]),
        "vllm_cpu_ms_bare": median("bare", lambda r: r["cpu_ms_per_request"]["vllm"]),
        "vllm_cpu_ms_guarded": median("guarded", lambda r: r["cpu_ms_per_request"]["vllm"]),
        "failed": sum(pair[t]["failed"] for pair in pairs for t in ("bare", "guarded")),
        "note": spread_note(policy, mode, concurrency, stats),
        "stopped": stopped,
        "stopped_note": stopped_note(policy, mode, concurrency, stopped, pairs),
        "pairs": pairs,
    }


def stopped_share(actions: dict[str, int] | None) -> float | None:
    """The share of a pass's audited requests the guard blocked or cut; None when nothing was audited."""
    if not actions or sum(actions.values()) == 0:
        return None
    return (actions.get("blocked", 0) + actions.get("cut", 0)) / sum(actions.values())


def stopped_note(policy: str, mode: str, concurrency: int, stopped: float | None, pairs: list[dict]) -> str | None:
    """A plain note when the guard stopped some of a level's requests: then fewer tokens reached the client and
    the output-throughput ratio is not the guard's cost alone; the request-throughput ratio is given beside it."""
    if not stopped:
        return None
    req = statistics.median(p["guarded"]["request_throughput"] / p["bare"]["request_throughput"] for p in pairs)
    return (
        f"{policy}, {mode}, concurrency {concurrency}: the guard blocked or cut {100 * stopped:.0f}% of the guarded "
        f"requests (median of the passes), which then delivered fewer tokens: the output-throughput ratio counts "
        f"only what was delivered. Requests per second, guarded/bare: {req:.2f}x (median of the pairs)."
    )


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


# ---- measuring ----


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and of its live descendants (vLLM may run its engine in a
    child). A child that exits between two samples takes its time with it; the in-process engine atu starts on a
    CPU has none."""
    import psutil

    proc = psutil.Process(pid)
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def measured(run: Callable[[], dict], pids: dict[str, int]) -> dict:
    """``run()`` (one pass) with the CPU time each process in ``pids`` spent over it, per completed request."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = run()
    done = max(result["completed"], 1)
    result["cpu_ms_per_request"] = {
        name: 1000 * (cpu_seconds(pid) - before[name]) / done for name, pid in pids.items()
    }
    return result


def vllm_bench(base_url: str, tokenizer: str, concurrency: int, num_prompts: int, input_len: int, output_len: int):
    """One run of vLLM's serving benchmark against ``base_url``; returns its result dict. No warm-up requests: they
    would cost CPU time that no completed request accounts for (the run warms both targets up once itself)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        [
            "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", MODEL_NAME, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--seed", "0", "--disable-tqdm", "--num-warmups", "0",
        ]
    )  # fmt: skip
    return main(args)


def keep(result: dict) -> dict:
    keys = ["completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput"]
    for metric in ("ttft", "tpot", "itl", "e2el"):
        keys += [f"mean_{metric}_ms", f"median_{metric}_ms", f"p50_{metric}_ms", f"p99_{metric}_ms"]
    return {k: result[k] for k in keys if k in result}


def random_prompts(tokenizer_dir: Path, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` random token ids (no special tokens), as vLLM's random dataset draws them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(seed)
    return [rng.choices(vocab, k=length) for _ in range(n)]


def complete(url: str, prompt, max_tokens: int, timeout: float = 300.0) -> dict:
    """One non-streamed greedy /v1/completions answer of exactly ``max_tokens`` tokens (EOS ignored)."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:  # say why: the body holds the guard's or vLLM's reason
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read()[:1000]!r}") from None


def closed_loop(url: str, prompts: list, concurrency: int, max_tokens: int) -> dict:
    """Non-streamed requests from ``concurrency`` threads, each sending its next prompt as soon as its last answer
    came, until ``prompts`` are used up; output tokens counted from each answer's ``usage``."""
    lock, todo = threading.Lock(), list(reversed(prompts))
    counts = {"completed": 0, "failed": 0, "tokens": 0}
    latencies: list[float] = []

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                prompt = todo.pop()
            t = time.perf_counter()
            try:
                tokens = complete(url, prompt, max_tokens)["usage"]["completion_tokens"]
            except (OSError, ValueError, KeyError):
                with lock:
                    counts["failed"] += 1
                continue
            with lock:
                counts["completed"] += 1
                counts["tokens"] += tokens
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.perf_counter() - start
    ms = sorted(1000 * x for x in latencies) or [float("nan")]
    return {
        "completed": counts["completed"],
        "failed": counts["failed"],
        "duration": duration,
        "output_throughput": counts["tokens"] / duration,
        "request_throughput": counts["completed"] / duration,
        "median_e2el_ms": statistics.median(ms),
        "p99_e2el_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
    }


def run_pass(cfg: argparse.Namespace, mode: str, url: str, concurrency: int, n: int) -> dict:
    """One pass of ``n`` requests at ``concurrency`` against ``url``."""
    if mode == "streamed":
        return keep(vllm_bench(url, str(cfg.export / "model"), concurrency, n, cfg.input_len, cfg.output_len))
    return closed_loop(url, cfg.prompts[:n], concurrency, cfg.output_len)


def audit_actions(path: str, since: float, expect: int, wait_s: float = 10.0) -> dict[str, int]:
    """What the guard did with the requests it audited from ``since`` (unix seconds) on: {action: count}. The
    log commits in groups, so this waits (up to ``wait_s``) until ``expect`` records are there."""
    import sqlite3

    deadline = time.monotonic() + wait_s
    while True:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT action, COUNT(*) FROM records WHERE time_unix >= ? GROUP BY action", (since,))
            counts = {action: n for action, n in rows}
        if sum(counts.values()) >= expect or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def run_pairs(cfg, mode: str, urls: dict[str, str], pids: dict[str, int], concurrency: int,
              audit: str | None = None) -> list[dict]:  # fmt: skip
    """``cfg.pairs`` bare/guarded pairs at one level, the order flipping from one pair to the next; with
    ``audit`` (the guard's log) each guarded pass records what the guard did with its requests."""
    n = max(16, cfg.prompts_per_client * concurrency)
    pairs = []
    for i in range(cfg.pairs):
        order = ("bare", "guarded") if i % 2 == 0 else ("guarded", "bare")
        pair = {}
        for target in order:
            print(f"=== {mode}, concurrency {concurrency}, pair {i + 1}/{cfg.pairs}: {target} ({n})", flush=True)
            since = time.time()
            pair[target] = measured(partial(run_pass, cfg, mode, urls[target], concurrency, n), pids)
            if target == "guarded" and audit is not None:
                pair[target]["actions"] = audit_actions(audit, since, pair[target]["completed"])
        pair["ratio"] = pair["guarded"]["output_throughput"] / pair["bare"]["output_throughput"]
        pairs.append(pair)
    return pairs


def single_latency(urls: dict[str, str], prompt: str, n: int, max_tokens: int) -> dict[str, list[float]]:
    """Wall seconds of ``n`` non-streamed completions of ``max_tokens`` tokens per URL, one request at a time,
    alternating between the URLs so that both see the same drift of a shared, noisy machine."""
    out: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(n):
        for name, base in urls.items():
            t = time.perf_counter()
            complete(base, prompt, max_tokens)
            out[name].append(time.perf_counter() - t)
    return out


def latency_summary(cfg, urls: dict[str, str]) -> dict | None:
    """The single-request latency figure; None when ``--single 0`` leaves it out."""
    if cfg.single < 1:
        return None
    prompt = "Where was the first person born?"
    single_latency(urls, prompt, 3, cfg.output_len)  # warm both paths
    lat = single_latency(urls, prompt, cfg.single, cfg.output_len)
    b, g = lat["bare"], lat["guarded"]
    return {
        "n": cfg.single,
        "max_tokens": cfg.output_len,
        "bare_p50_ms": 1000 * statistics.median(b),
        "guarded_p50_ms": 1000 * statistics.median(g),
        "added_paired_p50_ms": 1000 * statistics.median([gi - bi for gi, bi in zip(g, b)]),
    }


def bench_policy(cfg, policy: str, urls: dict[str, str], pids: dict[str, int],
                 audit: str | None = None) -> tuple[list[dict], dict]:  # fmt: skip
    """Every level and kind of request under one guard policy; (table rows, single-request latency)."""
    for mode in cfg.modes:  # a fresh guard's first requests pay for lazy set-up; no pass should carry that
        for target in ("bare", "guarded"):
            run_pass(cfg, mode, urls[target], 8, 8)
    rows = []
    for concurrency in cfg.concurrency:
        for mode in cfg.modes:
            pairs = run_pairs(cfg, mode, urls, pids, concurrency, audit)
            row = level_row(policy, mode, concurrency, pairs)
            s = row["ratio"]
            print(f"--- {policy}, {mode}, concurrency {concurrency}: guarded/bare {s['median']:.2f}x "
                  f"(min {s['min']:.2f}, max {s['max']:.2f}, IQR {s['iqr']:.2f})", flush=True)  # fmt: skip
            for note in (row["note"], row["stopped_note"]):
                if note:
                    print("NOTE: " + note, flush=True)
            rows.append(row)
    return rows, latency_summary(cfg, urls)


@contextlib.contextmanager
def relay_process(upstream: str, port: int, start_timeout: float = 60.0) -> Iterator[tuple[str, int]]:
    """Run the pass-through proxy (benchmarks/relay_floor.py) in front of ``upstream`` until exit; yields its URL
    and process id once it relays vLLM's /health (its output goes to a temporary log, shown if it fails to start)."""
    from atu.vllm_check import stop_process, wait_healthy

    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "relay_floor.py"), "--upstream", upstream, "--port", str(port)]
    with tempfile.NamedTemporaryFile("w+", prefix="atu-relay-", suffix=".log") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            wait_healthy(proc, log, url, "the relay", start_timeout)
            yield url, proc.pid
        finally:
            stop_process(proc)


# ---- the run ----


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--export", type=Path, default=ROOT / "demo_out" / "export", help="an export (default: make demo's)"
    )
    ap.add_argument("--concurrency", type=int, nargs="+", help="levels (default 1 8 32 64; --quick: 1 8)")
    ap.add_argument("--pairs", type=int, help="bare/guarded pairs per level (default 5; --quick: 2)")
    ap.add_argument(
        "--policies",
        nargs="+",
        choices=[*POLICIES, RELAY],
        default=list(POLICIES),
        help=f"guard policies to measure; '{RELAY}': a pass-through proxy instead of the guard (the hop's own cost)",
    )
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="kinds of request")
    ap.add_argument("--prompts-per-client", type=int, default=8, help="prompts per pass = this x concurrency (>= 16)")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument(
        "--single", type=int, default=30, help="sequential non-streamed requests for the latency figure (0: none)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 prompts per client, 2 pairs, levels 1 and 8")
    ap.add_argument(
        "--backend",
        choices=["capture", "hf"],
        default="capture",
        help="the guard's hidden states: recorded inside vLLM by the capture plugin (atu serve's default), or "
        "re-computed by transformers",
    )
    ap.add_argument(
        "--guard-args", default="", help="more `atu serve` options for the guard, e.g. '--stream-score-max-every 8'"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    if args.quick:
        args.prompts_per_client, args.single = 2, 10
    args.concurrency = args.concurrency or ([1, 8] if args.quick else [1, 8, 32, 64])
    args.pairs = args.pairs or (2 if args.quick else 5)
    if not (args.export / "manifest.json").is_file():
        raise SystemExit(f"{args.export} is not an export; run `make demo` first or pass --export")
    return args


def main() -> None:
    cfg = parse_args()
    from atu.vllm_check import free_port, vllm_process
    from serve.demo import atu_serve
    from serve.launch import capture_vllm

    cfg.prompts = random_prompts(cfg.export / "model", max(16, cfg.prompts_per_client * max(cfg.concurrency)),
                                 cfg.input_len)  # fmt: skip
    settings = (
        "input_len",
        "output_len",
        "backend",
        "pairs",
        "prompts_per_client",
        "concurrency",
        "modes",
        "policies",
        "guard_args",
    )
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "export": str(cfg.export),
        **{k: getattr(cfg, k) for k in settings},
        "rows": [],
        "single": {},
    }
    work = Path(tempfile.mkdtemp(prefix="atu-bench-"))
    sock = str(work / "capture.sock")
    # One vLLM server for every target, started as `atu serve` starts it for the chosen backend: for capture, the
    # plugin on (it records only the requests the guard marks) and prefix caching off (random prompts share none).
    vllm_args, env = ["--served-model-name", MODEL_NAME], {}
    guard_args = ["--model-name", MODEL_NAME, "--backend", cfg.backend, *shlex.split(cfg.guard_args)]
    if cfg.backend == "capture":
        capture_args, env = capture_vllm(cfg.export, sock)
        vllm_args += capture_args
        guard_args += ["--capture-socket", sock]
    t0 = time.time()
    with vllm_process(cfg.export / "model", extra_args=vllm_args, env=env) as bare:
        # One guard at a time, as users run it: a second guard idling beside the first would hold a second copy of
        # its fallback model and could take CPU from the pass being measured.
        for policy in cfg.policies:
            if policy == RELAY:
                with relay_process(bare.url, free_port()) as (url, pid):
                    rows, res["single"][policy] = bench_policy(cfg, policy, {"bare": bare.url, "guarded": url},
                                                               {"guard": pid, "vllm": bare.pid})  # fmt: skip
                res["rows"] += rows
                continue
            audit = str(work / f"audit-{policy}.sqlite")
            args = [*guard_args, "--upstream", bare.url, "--policy", policy, "--audit", audit]
            with atu_serve(cfg.export, free_port(), *args) as served:
                urls = {"bare": bare.url, "guarded": served.guard_url}
                try:
                    pids = {"guard": served.pid, "vllm": bare.pid}
                    rows, res["single"][policy] = bench_policy(cfg, policy, urls, pids, audit)
                except Exception:
                    print("the guard's last output:\n" + "\n".join(served.output[-40:]), flush=True)
                    raise
                res["rows"] += rows
    res["wall_seconds"] = round(time.time() - t0, 1)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "serving.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    md = markdown(res)
    (cfg.out / "serving.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
