"""The capture plugin's GPU copy, checked on one CUDA device without vLLM: does a step's hand-off return at once,
and does the guard's reader get exactly the rows the device held?

A stand-in engine loop runs decode-like steps (a matrix product over a batch of hidden states, as a layer would),
marks some rows per step, and hands them to the plugin's store the way the plugin does (``serve.capture``: rows
gathered on the device, copied to pinned host memory on a side stream, recorded once the copy's event has
passed). The same loop runs again with the old path (a synchronous ``.cpu()`` of the rows in the step). Prints
the engine loop's time per step both ways and checks every recorded row against the device's values.

    python benchmarks/gpu_capture_check.py [--steps 200] [--batch 256] [--hidden 4096] [--marked 64]

Writes nothing; exits 1 when a recorded row differs. Needs torch with CUDA and numpy only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.capture import CaptureStore, DeviceStep  # noqa: E402


def run(args, asynchronous: bool) -> tuple[float, bool]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    weight = torch.randn(args.hidden, args.hidden, device=dev, dtype=torch.bfloat16, generator=gen) / 64
    store = CaptureStore(args.hidden, max_rows=args.steps * args.marked + 1)
    stream = torch.cuda.Stream(dev)
    expected = {}
    hidden = torch.randn(args.batch, args.hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(args.steps):
        hidden = torch.tanh(hidden @ weight)  # the step's own work, queued on the current stream
        rows = torch.arange(args.marked, device=dev) * (args.batch // args.marked)
        states = hidden[rows].float()
        ids = torch.full((args.marked,), step, device=dev, dtype=torch.int64)
        starts = torch.full((args.marked,), step, device=dev, dtype=torch.int64)
        marked = [(f"k{i}", f"r{i}", 1) for i in range(args.marked)]
        if asynchronous:
            store.defer(marked, DeviceStep(states, ids, starts, stream))
        else:
            host = states.cpu().numpy()  # the old path: the step waits for its copy
            for i, (key, req, _) in enumerate(marked):
                store.record(key, req, step, np.array([step]), host[i : i + 1])
        if step % 50 == 0:  # keep a few steps' device values to compare with what the reader gets
            expected[step] = states.clone()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / args.steps
    got = store.take([f"k{i}" for i in range(args.marked)], release=True)
    ok = True
    for step, states in expected.items():
        want = states.cpu().numpy()
        for i in range(args.marked):
            (entry,) = got[f"k{i}"]
            ok &= bool(entry.ids[step] == step) and np.array_equal(entry.rows[step], want[i])
    return per_step, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--marked", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs on a GPU only")
    run(args, True)  # warm-up: kernels, the pinned-memory cache
    sync_s, sync_ok = run(args, False)
    async_s, async_ok = run(args, True)
    print(f"{torch.cuda.get_device_name()}: {args.steps} steps, batch {args.batch}, hidden {args.hidden}, "
          f"{args.marked} rows marked per step")  # fmt: skip
    print(f"engine loop per step: synchronous copy {1000 * sync_s:.3f} ms, side-stream copy {1000 * async_s:.3f} ms")
    print(f"rows recorded exactly: synchronous {sync_ok}, side-stream {async_ok}")
    sys.exit(0 if sync_ok and async_ok else 1)


if __name__ == "__main__":
    main()
