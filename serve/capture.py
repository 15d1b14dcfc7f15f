"""In-engine capture: record the hook layer's per-token states during vLLM's own generation pass.

The guard needs layer-``L`` states for every token of a prompt and its completion. Re-running layers ``0..L-1``
on each exchange (the ``hf`` and ``vllm`` backends) costs ``L/N`` of the model again; this plugin costs almost
nothing: vLLM computes those states anyway while it generates.

How it works (vLLM 0.32, V1 engine, eager mode):

- vLLM loads every ``vllm.general_plugins`` entry point in each of its processes; ``register`` is ours. It does
  nothing unless ``atu serve`` set ``ATU_CAPTURE_LAYER`` and ``ATU_CAPTURE_SOCKET`` (``atu.envs``).
- It wraps the model runner's ``_model_forward``. At the first call it adds a forward hook on decoder layer
  ``L-1``; vLLM's decoder layers return ``(hidden, residual)``, whose sum is the residual stream, i.e.
  Hugging Face's ``hidden_states[L]``.
- The guard marks the requests it wants recorded with ``vllm_xargs: {"atu_capture": KEY}`` (vLLM passes them on
  as ``SamplingParams.extra_args``). For those, each step's rows are stored by token position with the token id
  that was fed there, so chunked prefill and a preempted request's recomputation land in the right place.
  On a GPU the step's rows are copied to pinned host memory on a side stream (``DeviceStep``): the engine never
  waits for the copy; a reader of the store waits for copies still running.
- A thread in the engine process answers the guard on a Unix socket: the rows and token ids recorded under the
  asked keys, optionally releasing them. Rows not asked for are dropped oldest-first beyond a memory
  budget (``ATU_CAPTURE_MAX_MIB``, 256 by default).

A request's last generated token is never fed back into the model, so its row does not exist; the scorer never
reads that row (a completion's last token predicts text after the completion). Prefix caching must be off (a
cached prompt token is never computed, so it has no row); ``atu serve`` starts vLLM that way.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

XARG = "atu_capture"  # the vllm_xargs key that marks a request for capture
_MAX_ASK = 1 << 20  # a fetch names keys only; 1 MiB is thousands of them
_MAX_ANSWER_HEADER = 64 << 20  # an answer's header lists shapes per recorded request
_IDLE_S = 10.0  # a connected peer that sends nothing for this long is dropped
_MAX_RELEASED = 65_536  # released keys remembered (32-character keys: a few MiB)
_HEADER = struct.Struct("<Q")  # every message: 8-byte little-endian length of its JSON header, header, payload


# ---------------------------------------------------------------------------------------------- the store


@dataclass
class Captured:
    """What was recorded for one engine request: ``ids[t]`` was fed at position ``t`` and gave ``rows[t]``."""

    request_id: str
    ids: np.ndarray  # (n,) int64
    rows: np.ndarray  # (n, H) float32


class _Entry:
    """One engine request's rows, kept as the pieces the steps recorded and put together when read: a decode step
    adds one row per request, and writing each into a growing array (fresh pages, regrowth) cost several times what
    keeping the piece costs, while a reader asks once per scoring."""

    __slots__ = ("request_id", "dim", "pieces", "n")

    def __init__(self, request_id: str, dim: int) -> None:
        self.request_id = request_id
        self.dim = dim
        self.pieces: list[tuple[int, np.ndarray, np.ndarray]] = []  # (start, ids, rows), in the order recorded
        self.n = 0  # rows recorded: positions 0..n-1

    def put(self, start: int, ids: np.ndarray, rows: np.ndarray) -> int:
        """Rows at positions ``start..start+len(ids)-1`` (kept as given: the store's own arrays); returns how many
        rows the entry grew by. A position recorded twice keeps the later row."""
        end = start + len(ids)
        self.pieces.append((start, ids, rows))
        grown = max(0, end - self.n)
        self.n = max(self.n, end)
        return grown

    def assemble(self, keep: bool) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) for positions 0..n-1; a position never recorded has id -1 and a zero row. With ``keep`` (the
        entry stays for later reads: a held stream is read at every scoring) the joined arrays replace the pieces,
        so the next read joins only what came since, and the caller gets copies."""
        if len(self.pieces) == 1 and self.pieces[0][0] == 0:
            _, ids, rows = self.pieces[0]
        else:
            ids, rows = self._joined()
        if not keep:
            return ids, rows
        self.pieces = [(0, ids, rows)]
        return ids.copy(), rows.copy()

    def _joined(self) -> tuple[np.ndarray, np.ndarray]:
        starts = [start for start, _, _ in self.pieces]
        ends = [start + len(ids) for start, ids, _ in self.pieces]
        if starts[0] == 0 and starts[1:] == ends[:-1]:  # in order, without gaps or overlaps: the common case
            return np.concatenate([p[1] for p in self.pieces]), np.concatenate([p[2] for p in self.pieces])
        ids = np.full(self.n, -1, dtype=np.int64)
        rows = np.zeros((self.n, self.dim), dtype=np.float32)
        for start, piece_ids, piece_rows in self.pieces:
            ids[start : start + len(piece_ids)] = piece_ids
            rows[start : start + len(piece_ids)] = piece_rows
        return ids, rows


class CaptureStore:
    """Rows recorded per key (one key per guarded exchange, one or more engine requests under it). Thread-safe:
    the engine thread writes, the socket thread reads."""

    def __init__(self, dim: int, max_rows: int = 262_144, layer: int = 0, max_pending: int = 64) -> None:
        if dim < 1 or max_rows < 1 or max_pending < 1:
            raise ValueError(f"dim, max_rows and max_pending must be positive, got {dim}, {max_rows}, {max_pending}.")
        self.dim, self.max_rows, self.layer = dim, max_rows, layer
        self.max_pending = max_pending  # steps held for a reader before the engine records the finished ones itself
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # (key, request id), oldest first
        # Keys released already: a request the guard gave up on (its client left) may still run an engine step or
        # two before vLLM sees the abort; those rows would otherwise stay until the budget pushes them out.
        self._released: OrderedDict[str, None] = OrderedDict()
        self._rows = 0
        self._lock = threading.Lock()
        # Steps whose rows are still on their way to host memory (a GPU's copy runs beside the next step), oldest
        # first. One thread at a time moves them into the entries, so a reader never misses a step being moved.
        self._pending: deque[tuple[list[tuple[str, str, int]], Any]] = deque()
        self._settling = threading.Lock()

    def record(self, key: str, request_id: str, start: int, ids: np.ndarray, rows: np.ndarray) -> None:
        """Rows ``rows`` (n, H) of tokens ``ids`` (n,) at positions ``start..start+n-1`` of ``request_id``."""
        if rows.shape != (len(ids), self.dim):
            raise ValueError(f"rows must have shape ({len(ids)}, {self.dim}), got {tuple(rows.shape)}.")
        with self._lock:
            self._record(key, request_id, start, np.array(ids, dtype=np.int64), np.array(rows, dtype=np.float32))

    def _record(self, key: str, request_id: str, start: int, ids: np.ndarray, rows: np.ndarray) -> None:
        """`record` with the lock held and ``ids``/``rows`` the store's own arrays."""
        if key in self._released:
            return
        entry = self._entries.get((key, request_id))
        if entry is None:
            entry = self._entries[(key, request_id)] = _Entry(request_id, self.dim)
        else:
            self._entries.move_to_end((key, request_id))
        self._rows += entry.put(start, ids, rows)
        while self._rows > self.max_rows and len(self._entries) > 1:
            (old_key, old_req), old = self._entries.popitem(last=False)
            self._rows -= old.n
            logger.warning("capture store full: dropped %s/%s (%d rows) before the guard read it",
                           old_key, old_req, old.n)  # fmt: skip

    def defer(self, marked: list[tuple[str, str, int]], step) -> None:
        """One step's rows, maybe still being copied: ``marked`` lists (key, request id, rows) in row order and
        ``step.wait()`` gives ``(rows, ids, starts)`` (ids None when the step had no token ids; ``starts``: each
        request's first position). Returns at once: the steps are recorded when a reader asks, or, past
        ``max_pending`` steps, those whose copy has finished are recorded here."""
        with self._lock:
            self._pending.append((marked, step))
            backlog = len(self._pending) > self.max_pending
        # A reader records the steps when it asks (on its own thread, while the engine runs on); the engine
        # records finished ones itself only when no reader has asked for a while, to bound the held host buffers.
        if backlog and self._settling.acquire(blocking=False):  # else a reader is settling them: never wait
            try:
                self._settle(block=False)
            finally:
                self._settling.release()

    def pending(self) -> int:
        """Steps deferred and not yet recorded."""
        with self._lock:
            return len(self._pending)

    def _settle(self, block: bool) -> None:
        """Record deferred steps in order: all of them (``block``), or those whose copy has finished."""
        while True:
            with self._lock:
                if not self._pending or not (block or self._pending[0][1].ready()):
                    return
                marked, step = self._pending.popleft()
            rows, ids, starts = step.wait()
            ids = np.full(len(rows), -1, np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
            if rows.shape != (len(ids), self.dim) or sum(m[2] for m in marked) != len(rows):
                raise ValueError(f"a step's rows {tuple(rows.shape)} do not match its requests {marked}")
            at = 0
            with self._lock:  # once per step: a decode step records one row for each of many requests
                for (key, req_id, count), start in zip(marked, starts.tolist()):
                    # Each request's own copy, so that its rows cost what the budget counts once the step's
                    # buffers are gone.
                    piece = slice(at, at + count)
                    self._record(key, req_id, start, ids[piece].copy(), np.array(rows[piece], dtype=np.float32))
                    at += count

    def take(self, keys: list[str], release: bool) -> dict[str, list[Captured]]:
        """Copies of what is recorded under each key (engine request ids ascending); ``release`` forgets them.
        Steps still being copied are waited for first, so a reader sees every step that ran before it asked."""
        with self._settling:
            self._settle(block=True)
        wanted = set(keys)
        out: dict[str, list[Captured]] = {k: [] for k in keys}
        with self._lock:
            if release:
                for key in keys:
                    self._released[key] = None
                while len(self._released) > _MAX_RELEASED:
                    self._released.popitem(last=False)
            for (key, req), entry in list(self._entries.items()):
                if key not in wanted:
                    continue
                out[key].append(Captured(req, *entry.assemble(keep=not release)))
                if release:
                    del self._entries[(key, req)]
                    self._rows -= entry.n
        for found in out.values():
            found.sort(key=lambda c: c.request_id)
        return out

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------------------------------------- wire format


def _send(sock: socket.socket, header: dict, payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(_HEADER.pack(len(head)) + head + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the capture socket closed mid-message")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket, limit: int) -> dict:
    """One JSON header of at most ``limit`` bytes: a peer cannot make the other side allocate without bound."""
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if n > limit:
        raise ValueError(f"a capture message header of {n} bytes is over the {limit}-byte limit")
    return json.loads(_recv_exact(sock, n))


def encode_answer(found: dict[str, list[Captured]], dim: int, layer: int = 0) -> tuple[dict, bytes]:
    """Header and payload for ``found``: per entry its ids (int64) then its rows (float32), in header order."""
    header: dict = {"dim": dim, "layer": layer, "entries": []}
    parts = []
    for key, items in found.items():
        for c in items:
            header["entries"].append({"key": key, "request_id": c.request_id, "n": len(c.ids)})
            parts += [c.ids.astype("<i8").tobytes(), c.rows.astype("<f4").tobytes()]
    return header, b"".join(parts)


def decode_answer(header: dict, payload: bytes) -> dict[str, list[Captured]]:
    dim = int(header["dim"])
    out: dict[str, list[Captured]] = {}
    at = 0
    for e in header["entries"]:
        n = int(e["n"])
        ids = np.frombuffer(payload, dtype="<i8", count=n, offset=at).astype(np.int64)
        at += 8 * n
        rows = np.frombuffer(payload, dtype="<f4", count=n * dim, offset=at).reshape(n, dim).copy()
        at += 4 * n * dim
        out.setdefault(e["key"], []).append(Captured(e["request_id"], ids, rows))
    if at != len(payload):
        raise ValueError(f"capture answer payload has {len(payload)} bytes, the header describes {at}.")
    return out


class CaptureClient:
    """The guard's side: ``fetch(keys, release)`` over the plugin's Unix socket (one connection per call)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path, self.timeout = path, timeout
        self.layer = self.dim = self.stored = None  # what the plugin reported in its last answer

    def fetch(self, keys: list[str], release: bool = True) -> dict[str, list[Captured]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            _send(sock, {"keys": list(keys), "release": bool(release)})
            header = _recv(sock, _MAX_ANSWER_HEADER)
            if "error" in header:
                raise RuntimeError(f"the capture plugin answered an error: {header['error']}")
            size = int(header.pop("payload_bytes"))
            self.layer, self.dim, self.stored = header.get("layer"), header.get("dim"), header.get("stored")
            found = decode_answer(header, _recv_exact(sock, size))
        return {k: found.get(k, []) for k in keys}

    def ping(self) -> bool:
        """Whether a plugin answers on the socket."""
        try:
            self.fetch([], release=False)
            return True
        except OSError:
            return False


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux), or None where it cannot be read."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        store: CaptureStore = self.server.store  # type: ignore[attr-defined]
        uid = peer_uid(self.request)
        if uid is not None and uid != os.getuid():  # the states are the model's view of users' text
            logger.warning("capture socket: refused a peer of uid %d", uid)
            return
        self.request.settimeout(_IDLE_S)
        try:
            ask = _recv(self.request, _MAX_ASK)
            found = store.take(list(ask.get("keys") or []), bool(ask.get("release")))
            header, payload = encode_answer(found, store.dim, store.layer)
            header["stored"] = len(store)  # engine requests still held, after this answer
            header["payload_bytes"] = len(payload)
            _send(self.request, header, payload)
        except Exception as e:  # a bad client must not take the engine down
            logger.warning("capture request failed: %s", e)
            try:
                _send(self.request, {"error": str(e)})
            except OSError:
                pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve_store(store: CaptureStore, path: str) -> _Server:
    """Answer fetches for ``store`` on the Unix socket ``path`` from a daemon thread.

    A stale socket at ``path`` is replaced; any other file there is an error (never deleted). The socket is made
    0600 and answers only peers of this process's uid."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{path} exists and is not a socket; the capture plugin will not replace it.")
        os.unlink(path)
    server = _Server(path, _Handler)
    os.chmod(path, 0o600)
    server.store = store  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name="atu-capture", daemon=True).start()
    return server


# ---------------------------------------------------------------------------------------------- the vLLM side


def decoder_layer_list(model):
    """The decoder layers of a vLLM causal LM (``model.model.layers`` in Llama-like models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is None:
        layers = getattr(model, "layers", None)
    if layers is None:
        raise RuntimeError(f"cannot find the decoder layers of {type(model).__name__} for the capture plugin")
    return layers


def gather_rows(hidden, residual, rows: np.ndarray):
    """Rows ``rows`` of the residual stream (``hidden + residual``; ``hidden`` alone when ``residual`` is None), as a
    copy: the next layer's fused add-norm overwrites its inputs in place.

    Float32 tensors in host memory (the CPU engine) are read through numpy views: a decode step gathers one row per
    marked request, and in a busy engine each small torch op costs tens of microseconds where numpy's indexing
    costs a few, every step. Anything else (a GPU, bfloat16) is gathered by torch on its device and returned as a
    float32 tensor there."""
    import torch

    host = hidden.device.type == "cpu" and hidden.dtype == torch.float32
    if host and (residual is None or (residual.device.type == "cpu" and residual.dtype == torch.float32)):
        h = hidden.detach().numpy()[rows]  # fancy indexing copies
        return h if residual is None else np.add(h, residual.detach().numpy()[rows], out=h)
    idx = torch.from_numpy(rows).to(hidden.device, non_blocking=True)
    states = hidden[idx] + residual[idx] if residual is not None else hidden[idx]
    return states.detach().float()


class HostStep:
    """A step's selected rows, token ids and first positions already in host memory (the CPU engine: nothing to wait
    for); numpy arrays or CPU tensors."""

    def __init__(self, rows, ids, starts) -> None:
        self._arrays = (np.asarray(rows), None if ids is None else np.asarray(ids), np.asarray(starts))

    def ready(self) -> bool:
        return True

    def wait(self):
        return self._arrays


class DeviceStep:
    """A step's selected tensors copied from the GPU to pinned host memory on a side stream.

    The copy is queued after the step's work on the side stream and an event marks its end; the engine goes on
    to its next step at once. The gathered device tensors are tied to the side stream (``record_stream``), so the
    caching allocator does not hand their memory out before the copy has read it. ``wait`` blocks on the event
    only (the guard's reader, never the engine)."""

    def __init__(self, rows, ids, starts, stream) -> None:
        import torch

        stream.wait_stream(torch.cuda.current_stream(rows.device))
        self._host = []
        with torch.cuda.stream(stream):
            for t in (rows, ids, starts):
                if t is None or not t.is_cuda:  # a host tensor (the runner's CPU buffer): copy before it is reused
                    self._host.append(None if t is None else t.clone())
                    continue
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t.record_stream(stream)
                self._host.append(host)
            self._event = torch.cuda.Event()
            self._event.record(stream)

    def ready(self) -> bool:
        return bool(self._event.query())

    def wait(self):
        self._event.synchronize()
        rows, ids, starts = self._host
        return rows.numpy(), None if ids is None else ids.numpy(), starts.numpy()


class _EngineCapture:
    """Installed on one model runner: the forward hook, the store and the socket server."""

    def __init__(self, runner, layer: int, path: str, max_bytes: int) -> None:
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        layers = decoder_layer_list(model)
        if not 1 <= layer <= len(layers):
            raise RuntimeError(f"capture layer {layer} is outside 1..{len(layers)} (the model's decoder layers)")
        dim = int(runner.model_config.get_hidden_size())
        self.store = CaptureStore(dim, max(1, max_bytes // (4 * dim)), layer)  # float32 rows
        self.rows = None  # (n,) int64 token indices (in this step's batch) of the marked requests; None: none
        self.states = None  # (len(rows), H) of the current forward, set by the hook: numpy on the host path
        self._stream = None  # the side stream of the GPU copies (created at the first one)

        def hook(_module, _args, output):
            if self.rows is not None:
                hidden, residual = (output[0], output[1] if len(output) > 1 else None) if isinstance(output, tuple) \
                    else (output, None)  # fmt: skip
                # Only the marked requests' rows; a device tensor stays there, ``save`` starts its copy.
                self.states = gather_rows(hidden, residual, self.rows)

        layers[layer - 1].register_forward_hook(hook)
        self.server = serve_store(self.store, path)
        logger.info("atu capture: recording layer %d (width %d) for the guard on %s", layer, dim, path)

    def layout(self, runner) -> list[tuple[str, str, int, int]]:
        """(key, request id, first token index in this step's batch, tokens) of the marked requests."""
        batch = runner.input_batch
        n = batch.num_reqs
        qsl = runner.query_start_loc.np[: n + 1]
        out = []
        for i, req_id in enumerate(batch.req_ids[:n]):
            state = runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            extra = getattr(params, "extra_args", None) or {}
            key = extra.get(XARG)
            if key is not None and qsl[i + 1] > qsl[i]:
                out.append((str(key), req_id, int(qsl[i]), int(qsl[i + 1] - qsl[i])))
        return out

    def select(self, marked) -> None:
        """Ask the hook for the rows of the ``marked`` requests (``layout``) in the coming forward."""
        self.rows = np.concatenate([np.arange(first, first + n) for _, _, first, n in marked])

    def save(self, marked, input_ids, positions) -> None:
        """Start moving the marked requests' rows, token ids and first positions to host memory (on a GPU without
        waiting for the copy) and hand them to the store."""
        import torch

        states, rows = self.states, self.rows
        self.rows = self.states = None
        if states is None:
            return
        firsts = np.array([first for _, _, first, _ in marked], dtype=np.int64)
        if positions.ndim > 1:  # M-RoPE positions (3, T): the first row is the text position
            positions = positions[0]
        if isinstance(states, np.ndarray):  # the host path (``gather_rows``): index the host tensors by numpy too
            ids = None if input_ids is None else input_ids.detach().cpu().numpy()[rows]
            step = HostStep(states, ids, positions.detach().cpu().numpy()[firsts])
        else:
            starts = positions[torch.from_numpy(firsts).to(positions.device, non_blocking=True)]
            idx = torch.from_numpy(rows)
            ids = input_ids[idx.to(input_ids.device, non_blocking=True)] if input_ids is not None else None
            if states.device.type == "cuda":
                if self._stream is None:
                    self._stream = torch.cuda.Stream(states.device)
                step = DeviceStep(states, ids, starts, self._stream)
            else:
                step = HostStep(states, None if ids is None else ids.cpu(), starts.cpu())
        self.store.defer([(key, req_id, count) for key, req_id, _, count in marked], step)


def _wrap_runner(cls, layer: int, path: str, max_bytes: int) -> None:
    """Patch ``cls`` (a model runner class): capture starts once its model is loaded; every forward records."""
    if "_atu_capture_patched" in cls.__dict__:
        return
    load, forward = cls.__dict__.get("load_model"), cls.__dict__.get("_model_forward")  # only what cls defines:

    def load_model(self, *args, **kwargs):
        load(self, *args, **kwargs)
        if getattr(self, "_atu_capture", None) is None:
            self._atu_capture = _EngineCapture(self, layer, path, max_bytes)

    def _model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        cap = getattr(self, "_atu_capture", None)
        marked = cap.layout(self) if cap is not None and positions is not None else []
        if not marked:
            return forward(self, input_ids, positions, *args, **kwargs)
        cap.select(marked)
        try:
            out = forward(self, input_ids, positions, *args, **kwargs)
        except BaseException:
            cap.rows = cap.states = None
            raise
        try:
            cap.save(marked, input_ids if input_ids is not None else self.input_ids.cpu, positions)
        except Exception:  # never let the guard's bookkeeping fail a generation step
            logger.exception("atu capture: could not record this step")
        return out

    if load is not None:  # a subclass that inherits a method gets the patched one through its parent
        cls.load_model = load_model
    if forward is not None:
        cls._model_forward = _model_forward
    cls._atu_capture_patched = True


def register() -> None:
    """vLLM general-plugin entry point (``vllm.general_plugins``): a no-op unless ``atu serve`` asked for capture."""
    from atu.envs import capture_settings

    settings = capture_settings()
    if settings is None:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [GPUModelRunner]
    try:  # the CPU runner overrides load_model without calling the GPU one
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in runners:
        _wrap_runner(cls, *settings)
