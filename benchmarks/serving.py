"""Serving throughput and latency: bare vLLM against vLLM behind the guard (monitor mode), one server, one run.

The load is vLLM's own serving benchmark (``vllm.benchmarks.serve``, run as a library): a closed loop of N
concurrent streaming clients with random prompts of fixed length and a fixed output length (``--ignore-eos``), for
N in 1, 8, 32. Bare and guarded runs alternate at each N against the same vLLM server, so they share its warm state
and the machine's noise. A second measurement times non-streamed 64-token completions one at a time, to report the
latency the guard adds to a single request.

    python benchmarks/serving.py                 # the export of `make demo` (demo_out/export)
    python benchmarks/serving.py --quick         # fewer prompts per level

Writes results/serving.json and results/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "bench"


def vllm_bench(base_url: str, tokenizer: str, concurrency: int, num_prompts: int, input_len: int, output_len: int):
    """One run of vLLM's serving benchmark against ``base_url``; returns its result dict."""
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
            "--seed", "0", "--disable-tqdm", "--num-warmups", str(min(concurrency, 8)),
        ]
    )  # fmt: skip
    return main(args)


def keep(result: dict) -> dict:
    keys = ["completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput"]
    for metric in ("ttft", "tpot", "itl", "e2el"):
        keys += [f"mean_{metric}_ms", f"median_{metric}_ms", f"p50_{metric}_ms", f"p99_{metric}_ms"]
    return {k: result[k] for k in keys if k in result}


def single_latency(urls: dict[str, str], prompt: str, n: int, max_tokens: int) -> dict[str, list[float]]:
    """Wall seconds of ``n`` non-streamed completions of ``max_tokens`` tokens per URL, one request at a time,
    alternating between the URLs so that both see the same drift of a shared, noisy machine."""
    body = json.dumps(
        {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    ).encode()
    out: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(n):
        for name, base in urls.items():
            req = urllib.request.Request(
                base + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
            )
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=120) as resp:
                resp.read()
            out[name].append(time.perf_counter() - t)
    return out


def markdown(res: dict) -> str:
    lines = [
        f"# Serving: bare vLLM vs guarded (monitor, backend {res.get('backend', 'hf')}), {res['machine']}",
        "",
        f"Export: `{res['export']}`; random prompts of {res['input_len']} tokens, {res['output_len']} output tokens, "
        "streaming, vLLM's serving benchmark. Both targets use the same vLLM server.",
        "",
        "| concurrency | target | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms "
        "| E2E p50 ms | E2E p99 ms | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["load"]:
        for target in ("bare", "guarded"):
            r = row[target]
            lines.append(
                f"| {row['concurrency']} | {target} | {r['output_throughput']:.0f} | {r['request_throughput']:.2f} "
                f"| {r['median_ttft_ms']:.1f} | {r['p99_ttft_ms']:.1f} | {r['median_tpot_ms']:.2f} "
                f"| {r['p99_tpot_ms']:.2f} | {r['median_e2el_ms']:.0f} | {r['p99_e2el_ms']:.0f} | {r['failed']} |"
            )
        lines.append(
            f"| {row['concurrency']} | **guarded/bare** | **{row['throughput_ratio']:.2f}x** | | | | | | | | |"
        )
    s = res["single"]
    lines += [
        "",
        f"Non-streamed {s['max_tokens']}-token completion, one at a time ({s['n']} each): p50 bare "
        f"{s['bare_p50_ms']:.1f} ms, guarded {s['guarded_p50_ms']:.1f} ms: added **{s['added_p50_ms']:.1f} ms** "
        f"(median of the paired differences, requests alternating: {s['added_paired_p50_ms']:.1f} ms).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--export", type=Path, default=ROOT / "demo_out" / "export", help="an export (default: make demo's)"
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompts-per-client", type=int, default=8, help="prompts per level = this x concurrency (>= 16)")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--single", type=int, default=30, help="sequential non-streamed requests for the latency figure")
    ap.add_argument("--quick", action="store_true", help="2 prompts per client, 10 sequential requests")
    ap.add_argument(
        "--backend",
        choices=["capture", "hf"],
        default="capture",
        help="the guard's hidden states: recorded inside vLLM by the capture plugin (atu serve's default), or "
        "re-computed by transformers",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    if args.quick:
        args.prompts_per_client, args.single = 2, 10
    if not (args.export / "manifest.json").is_file():
        raise SystemExit(f"{args.export} is not an export; run `make demo` first or pass --export")

    from atu.vllm_check import free_port, vllm_server
    from serve.demo import atu_serve
    from serve.launch import capture_vllm

    model_dir = args.export / "model"
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "export": str(args.export),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "backend": args.backend,
        "load": [],
    }
    work = Path(tempfile.mkdtemp(prefix="atu-bench-"))
    audit, sock = work / "audit.sqlite", str(work / "capture.sock")
    # One vLLM server for both targets, started as `atu serve` starts it for the chosen backend: for capture, the
    # plugin on (it records only the requests the guard marks) and prefix caching off (random prompts share none).
    vllm_args, env = ["--served-model-name", MODEL_NAME], {}
    guard_args = ["--model-name", MODEL_NAME, "--audit", str(audit), "--backend", args.backend]
    if args.backend == "capture":
        capture_args, env = capture_vllm(args.export, sock)
        vllm_args += capture_args
        guard_args += ["--capture-socket", sock]
    t0 = time.time()
    with vllm_server(model_dir, extra_args=vllm_args, env=env) as bare:
        guard_args += ["--upstream", bare]
        with atu_serve(args.export, free_port(), *guard_args) as served:  # the guard as users run it
            guarded = served.guard_url
            for conc in args.concurrency:
                n = max(16, args.prompts_per_client * conc)
                row = {"concurrency": conc, "num_prompts": n}
                for target, url in (("bare", bare), ("guarded", guarded)):
                    print(f"\n=== concurrency {conc}: {target} ({n} prompts) ===", flush=True)
                    row[target] = keep(vllm_bench(url, str(model_dir), conc, n, args.input_len, args.output_len))
                row["throughput_ratio"] = row["guarded"]["output_throughput"] / row["bare"]["output_throughput"]
                res["load"].append(row)
            prompt = "Where was the first person born?"
            urls = {"bare": bare, "guarded": guarded}
            single_latency(urls, prompt, 3, args.output_len)  # warm both paths
            lat = single_latency(urls, prompt, args.single, args.output_len)
            b, g = lat["bare"], lat["guarded"]
            res["single"] = {
                "n": args.single,
                "max_tokens": args.output_len,
                "bare_p50_ms": 1000 * statistics.median(b),
                "guarded_p50_ms": 1000 * statistics.median(g),
                "added_p50_ms": 1000 * (statistics.median(g) - statistics.median(b)),
                "added_paired_p50_ms": 1000 * statistics.median([gi - bi for gi, bi in zip(g, b)]),
            }
    res["wall_seconds"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    md = markdown(res)
    (args.out / "serving.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
