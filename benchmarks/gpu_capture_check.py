"""The capture plugin's GPU copy, checked on one CUDA device without vLLM: does a step's hand-off let the engine go
on at once, and does the guard's reader get exactly the rows the device held?

A stand-in engine loop runs decode-like steps: GPU work queued per step (``--layers`` matrix products over a batch
of hidden states, as a model's layers would) and host work per step (``--host-ms`` of busy Python, standing for the
scheduling and bookkeeping an engine does while the GPU runs the step it queued). It marks some rows per step and
hands them to the plugin's store the way the plugin does (``serve.capture``: rows gathered on the device, copied to
pinned host memory on a side stream, recorded once the copy's event has passed). A reader thread asks the store
every ``--read-ms`` as the guard's fetches would. The loop runs three ways:

- ``none``: no capture, the floor;
- ``sync``: the old path, a synchronous ``.cpu()`` of the step's rows, which makes the host wait for the GPU's
  step before it does its own work, so the two no longer overlap;
- ``side-stream``: the plugin's path.

Prints the time per step of each and the ratio to the floor, and checks every recorded row against the device's
values.

    python benchmarks/gpu_capture_check.py [--steps 200] [--batch 256] [--hidden 4096] [--layers 32]
                                           [--marked 64] [--host-ms 2] [--read-ms 20]

Writes nothing; exits 1 when a recorded row differs. Needs torch with CUDA and numpy only.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.capture import CaptureStore, DeviceStep  # noqa: E402

MODES = ("none", "sync", "side-stream")


def _host_work(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run(args, mode: str) -> tuple[float, bool]:
    """Seconds per step of the stand-in loop with capture ``mode``, and whether every checked row came back exact."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    weight = torch.randn(args.hidden, args.hidden, device=dev, dtype=torch.bfloat16, generator=gen) / 64
    store = CaptureStore(args.hidden, max_rows=args.steps * args.marked + 1)
    stream = torch.cuda.Stream(dev)
    expected = {}
    hidden = torch.randn(args.batch, args.hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    rows = torch.arange(args.marked, device=dev) * (args.batch // args.marked)
    marked = [(f"k{i}", f"r{i}", 1) for i in range(args.marked)]
    stop = threading.Event()

    def read() -> None:  # the guard's fetches: each one records the steps handed over since the last
        while not stop.wait(args.read_ms / 1000):
            store.take([], release=False)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(args.steps):
        for _ in range(args.layers):  # the step's own work, queued on the current stream
            hidden = torch.tanh(hidden @ weight)
        states = hidden[rows].float()
        ids = torch.full((args.marked,), step, device=dev, dtype=torch.int64)
        starts = torch.full((args.marked,), step, device=dev, dtype=torch.int64)
        if mode == "side-stream":
            store.defer(marked, DeviceStep(states, ids, starts, stream))
        elif mode == "sync":
            host = states.cpu().numpy()  # the host waits here for the step's GPU work
            for i, (key, req, _) in enumerate(marked):
                store.record(key, req, step, np.array([step]), host[i : i + 1])
        _host_work(args.host_ms / 1000)
        if mode != "none" and step % 50 == 0:  # keep a few steps' device values to compare with what the reader gets
            expected[step] = states.clone()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / args.steps
    stop.set()
    reader.join()
    if mode == "none":
        return per_step, True
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
    ap.add_argument("--layers", type=int, default=32, help="matrix products queued per step")
    ap.add_argument("--marked", type=int, default=64, help="rows captured per step")
    ap.add_argument("--host-ms", type=float, default=2.0, help="host work per step, beside the GPU's")
    ap.add_argument("--read-ms", type=float, default=20.0, help="time between the reader's fetches")
    ap.add_argument("--repeats", type=int, default=3, help="passes of each mode, interleaved; the median is shown")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs on a GPU only")
    for mode in MODES:  # warm-up: kernels, the pinned-memory cache
        run(args, mode)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    exact = True
    for _ in range(args.repeats):
        for mode in MODES:
            seconds, ok = run(args, mode)
            times[mode].append(seconds)
            exact &= ok
    gpu_only = argparse.Namespace(**{**vars(args), "host_ms": 0.0})
    gpu_s = float(np.median([run(gpu_only, "none")[0] for _ in range(args.repeats)]))
    print(f"{torch.cuda.get_device_name()}: {args.steps} steps of {args.layers} products, batch {args.batch}, "
          f"hidden {args.hidden}, {args.marked} rows captured per step, {args.host_ms:g} ms host work per step; "
          f"the GPU's work alone: {1000 * gpu_s:.3f} ms per step")  # fmt: skip
    floor = float(np.median(times["none"]))
    for mode in MODES:
        med = float(np.median(times[mode]))
        spread = ", ".join(f"{1000 * t:.3f}" for t in times[mode])
        print(f"  {mode:<12} {1000 * med:7.3f} ms per step ({spread}); {med / floor:.3f}x the floor")
    print(f"rows recorded exactly: {exact}")
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()
