"""Where the guard's time goes under streamed load: drive a running guard with concurrent streamed completions
while ``py-spy`` samples its process, then tabulate the samples by the guard's own functions.

    atu serve EXPORT --policy block --port 18080 --no-audit &           # vLLM and the guard
    python benchmarks/guard_profile.py load http://127.0.0.1:18080 --seconds 45 --clients 32 &
    py-spy record -p GUARD_PID --duration 45 --rate 200 --format raw -o guard.txt --nonblocking
    python benchmarks/guard_profile.py table guard.txt

``py-spy`` (``pip install py-spy``) is not a dependency of the project. The table gives, for each function, the
share of samples whose stack holds it (inclusive time; a thread waiting in ``select`` is the event loop idle).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import re
import time

FUNCTIONS = [
    ("Scorer.score_batch", "scoring, in the scoring thread"),
    ("Scorer._extend_streams", "  the predictor on streams' new tokens"),
    ("CaptureBackend.hidden_states", "  the hook-layer states from vLLM's capture plugin"),
    ("Scorer._report", "  reports: concept scores, spans, excerpts"),
    ("Scorer._tokenize", "  tokenisation"),
    ("ScoreBatcher._run", "batching the scoring requests"),
    ("Relay.run", "relaying stream events"),
    ("guard_middleware", "request handling around the exchange"),
    ("EpollSelector.select", "event loop waiting (idle)"),
]
WORDS = "the river old town market lamp stone field winter song paper road bell garden".split()


def table(path: str) -> str:
    """A markdown table of the shares of samples in ``FUNCTIONS`` from a py-spy raw (collapsed stacks) file."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in open(path):
        if not line.strip():
            continue
        stack, n = line.rstrip().rsplit(" ", 1)
        total += int(n)
        names = {re.sub(r" \(.*", "", frame) for frame in stack.split(";")}
        for name in names:
            counts[name] += int(n)
    rows = [f"| {what} | `{fn}` | {100 * counts[fn] / max(total, 1):.1f}% |" for fn, what in FUNCTIONS]
    return "\n".join([f"{total} samples", "", "| part | function | share of samples |", "|---|---|---|", *rows])


async def _load(url: str, seconds: float, clients: int) -> int:
    import aiohttp

    done, stop = [0], time.time() + seconds

    async def client(session) -> None:
        rng = random.Random()
        while time.time() < stop:
            body = {"model": "export", "prompt": " ".join(rng.choice(WORDS) for _ in range(24)), "max_tokens": 64,
                    "stream": True, "ignore_eos": True, "temperature": 0}  # fmt: skip
            async with session.post(url + "/v1/completions", json=body) as r:
                async for _ in r.content:
                    pass
            done[0] += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return done[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    load = sub.add_parser("load", help="streamed completions from concurrent clients for a while")
    load.add_argument("url")
    load.add_argument("--seconds", type=float, default=45.0)
    load.add_argument("--clients", type=int, default=32)
    tab = sub.add_parser("table", help="tabulate a py-spy raw file")
    tab.add_argument("path")
    args = ap.parse_args(argv)
    if args.cmd == "load":
        n = asyncio.run(_load(args.url, args.seconds, args.clients))
        print(f"{n} requests in {args.seconds:.0f} s ({n / args.seconds:.1f}/s) from {args.clients} clients")
    else:
        print(table(args.path))


if __name__ == "__main__":
    main()
