"""The in-engine capture plugin and the capture backend: the store, the wire format and the matching as pure code;
then the plugin inside the session's real vLLM server, against transformers and through the guard."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from serve_helpers import TINY_MODEL_NAME, http, sse_events

from serve.backends import BackendError, CaptureBackend, match_capture
from serve.capture import (
    XARG,
    CaptureClient,
    Captured,
    CaptureStore,
    HostStep,
    decode_answer,
    encode_answer,
    gather_rows,
    serve_store,
)
from serve.policy import take_token_ids


def _rows(n, dim=4, start=0):
    return np.arange(start * dim, (start + n) * dim, dtype=np.float32).reshape(n, dim)


# -- the hook's gather ---------------------------------------------------------------------------------------------


def test_gather_rows_reads_host_float32_by_numpy_and_anything_else_by_torch_with_the_same_rows():
    import torch

    gen = torch.Generator().manual_seed(0)
    hidden, residual = torch.randn(9, 6, generator=gen), torch.randn(9, 6, generator=gen)
    rows = np.array([7, 2, 3])
    want = (hidden + residual)[torch.from_numpy(rows)].numpy()
    with torch.inference_mode():  # as vLLM runs its forward
        host = gather_rows(hidden, residual, rows)
        alone = gather_rows(hidden, None, rows)
        other = gather_rows(hidden.double(), residual.double(), rows)  # not float32: the torch path
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    np.testing.assert_allclose(host, want, rtol=0, atol=1e-6)
    want_alone = hidden.numpy()[rows].copy()
    np.testing.assert_array_equal(alone, want_alone)
    assert isinstance(other, torch.Tensor) and other.dtype == torch.float32
    np.testing.assert_allclose(other.numpy(), want, rtol=0, atol=1e-6)
    before = host.copy()
    hidden.zero_(), residual.zero_()  # the next layer overwrites its inputs in place: the gathered rows are copies
    np.testing.assert_array_equal(host, before)
    np.testing.assert_array_equal(alone, want_alone)


def test_a_host_step_takes_numpy_arrays_or_cpu_tensors():
    import torch

    rows, ids, starts = np.ones((2, 3), np.float32), np.array([4, 5]), np.array([0])
    for step in (HostStep(rows, ids, starts), HostStep(torch.from_numpy(rows), torch.from_numpy(ids), starts)):
        got_rows, got_ids, got_starts = step.wait()
        assert step.ready()
        np.testing.assert_array_equal(got_rows, rows)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_starts, starts)
    assert HostStep(rows, None, starts).wait()[1] is None


# -- the store ----------------------------------------------------------------------------------------------------
def test_store_assembles_chunked_prefill_and_decode_steps_by_position():
    store = CaptureStore(dim=4)
    store.record("k", "r", 0, np.array([1, 2, 3]), _rows(3))  # a prefill chunk
    store.record("k", "r", 3, np.array([4, 5]), _rows(2, start=3))  # the rest of the prompt
    store.record("k", "r", 5, np.array([6]), _rows(1, start=5))  # one decode step
    (got,) = store.take(["k"], release=False)["k"]
    assert got.ids.tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(got.rows, _rows(6))
    store.record("k", "r", 0, np.array([1, 2]), -_rows(2))  # a preempted request recomputed from the start
    (again,) = store.take(["k"], release=True)["k"]
    assert again.ids.tolist() == [1, 2, 3, 4, 5, 6]  # nothing lost, the recomputed rows replace the old ones
    np.testing.assert_array_equal(again.rows[:2], -_rows(2))
    assert store.take(["k"], release=True) == {"k": []} and len(store) == 0


def test_store_keeps_requests_apart_and_drops_the_oldest_when_full():
    store = CaptureStore(dim=4, max_rows=10)
    store.record("a", "r1", 0, np.arange(6), _rows(6))
    store.record("b", "r2", 0, np.arange(3), _rows(3))
    store.record("b", "r3", 0, np.arange(3), _rows(3))  # 12 rows > 10: the oldest entry ("a") goes
    got = store.take(["a", "b"], release=False)
    assert got["a"] == [] and [c.request_id for c in got["b"]] == ["r2", "r3"]
    with pytest.raises(ValueError, match="rows must have shape"):
        store.record("c", "r", 0, np.arange(2), _rows(3))


def test_store_ignores_rows_of_a_released_key():
    store = CaptureStore(dim=4, max_rows=100)
    store.record("a", "r1", 0, np.arange(3), _rows(3))
    assert [c.request_id for c in store.take(["a"], release=True)["a"]] == ["r1"]
    store.record("a", "r1", 3, np.arange(1), _rows(1))  # an engine step that ran before vLLM saw the abort
    assert len(store) == 0 and store.take(["a"], release=False)["a"] == []


class _Step:
    """A step whose copy to host memory finishes when the test says so (as a GPU's side-stream copy would)."""

    def __init__(self, rows, ids, starts, ready=False):
        self.arrays, self.done, self.waited = (rows, ids, np.array(starts)), ready, False

    def ready(self):
        return self.done

    def wait(self):
        self.waited = True
        return self.arrays


def test_store_records_deferred_steps_in_order_when_a_reader_asks():
    store = CaptureStore(dim=4)
    first = _Step(_rows(5), np.arange(10, 15), [0, 0], ready=True)  # a prefill step of two requests
    store.defer([("k", "r1", 3), ("j", "r2", 2)], first)
    store.defer([("k", "r1", 1)], _Step(_rows(1, start=3), np.array([13]), [3], ready=True))  # the next decode step
    store.defer([("j", "r2", 1)], _Step(_rows(1, start=9), None, [2], ready=True))
    assert store.pending() == 3 and len(store) == 0 and not first.waited  # the engine's hand-off records nothing
    got = store.take(["k", "j"], release=True)
    assert store.pending() == 0 and first.waited
    assert got["k"][0].ids.tolist() == [10, 11, 12, 13]
    np.testing.assert_array_equal(got["k"][0].rows, np.concatenate([_rows(3), _rows(1, start=3)]))
    assert got["j"][0].ids.tolist() == [13, 14, -1]  # a step without token ids records -1 at its positions
    np.testing.assert_array_equal(got["j"][0].rows, np.concatenate([_rows(2, start=3), _rows(1, start=9)]))


def test_a_backlog_is_recorded_by_the_engine_in_order_up_to_the_first_unfinished_copy():
    store = CaptureStore(dim=4, max_pending=4)
    first = _Step(_rows(1), np.array([5]), [0])  # its copy is still running
    store.defer([("k", "r", 1)], first)
    for t in range(1, store.max_pending + 1):  # no reader asks: the steps pile up
        store.defer([("k", "r", 1)], _Step(_rows(1, start=t), np.array([5 + t]), [t], ready=True))
    assert store.pending() == store.max_pending + 1 and len(store) == 0  # nothing ahead of the unfinished step
    first.done = True
    store.defer([("k", "r", 1)], _Step(_rows(1, start=99), np.array([0]), [store.max_pending + 1], ready=True))
    assert store.pending() == 0 and len(store) == 1
    (got,) = store.take(["k"], release=True)["k"]
    assert got.ids.tolist() == [5 + t for t in range(store.max_pending + 1)] + [0]


def test_a_position_recorded_twice_keeps_the_later_row():
    store = CaptureStore(dim=4)
    store.record("k", "r", 0, np.array([1, 2, 3]), _rows(3))
    store.record("k", "r", 1, np.array([7]), _rows(1, start=20))  # a recomputed position (after a preemption)
    (got,) = store.take(["k"], release=False)["k"]
    assert got.ids.tolist() == [1, 7, 3]
    np.testing.assert_array_equal(got.rows, np.concatenate([_rows(1), _rows(1, start=20), _rows(1, start=2)]))


def test_reads_that_keep_an_entry_see_every_row_since_and_never_share_its_arrays():
    store = CaptureStore(dim=4)
    for t in range(3):
        store.record("k", "r", t, np.array([t]), _rows(1, start=t))
    (first,) = store.take(["k"], release=False)["k"]  # a held stream's scoring: the entry stays
    first.rows[:] = -1  # the reader's copy is its own
    store.record("k", "r", 3, np.array([3]), _rows(1, start=3))
    (second,) = store.take(["k"], release=False)["k"]
    assert second.ids.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(second.rows, _rows(4))
    (last,) = store.take(["k"], release=True)["k"]
    assert last.ids.tolist() == [0, 1, 2, 3] and len(store) == 0


def test_a_reader_waits_for_steps_still_being_copied():
    store = CaptureStore(dim=4)
    step = _Step(_rows(2), np.array([7, 8]), [0])
    store.defer([("k", "r", 2)], step)
    assert store.pending() == 1
    (got,) = store.take(["k"], release=False)["k"]  # not ready: the reader waits for it instead of missing it
    assert step.waited and got.ids.tolist() == [7, 8] and store.pending() == 0


def test_answer_round_trips_through_the_wire_format():
    found = {"k1": [Captured("r1", np.array([5, 6, 7]), _rows(3))], "k2": [], "k3": [
        Captured("r2", np.array([9]), _rows(1, start=7)), Captured("r3", np.array([1, 2]), _rows(2))]}  # fmt: skip
    header, payload = encode_answer(found, dim=4, layer=2)
    assert header["layer"] == 2
    back = decode_answer(header, payload)
    for key, items in found.items():
        for a, b in zip(items, back.get(key, [])):
            assert a.request_id == b.request_id and a.ids.tolist() == b.ids.tolist()
            np.testing.assert_array_equal(a.rows, b.rows)
        assert len(back.get(key, [])) == len(items)
    with pytest.raises(ValueError, match="payload"):
        decode_answer(header, payload + b"\0")


def test_client_and_server_over_a_unix_socket():
    store = CaptureStore(dim=4, layer=3)
    store.record("k", "r", 0, np.array([1, 2]), _rows(2))
    path = os.path.join(tempfile.mkdtemp(), "c.sock")
    server = serve_store(store, path)
    try:
        client = CaptureClient(path)
        assert client.ping() and (client.layer, client.dim) == (3, 4)
        assert client.fetch(["k", "nothing"], release=False)["nothing"] == []
        assert client.fetch(["k"], release=True)["k"][0].ids.tolist() == [1, 2]
        assert client.fetch(["k"])["k"] == []
    finally:
        server.shutdown()
        server.server_close()
    assert not CaptureClient(path + ".missing").ping()


def test_capture_socket_is_private_bounded_and_never_replaces_a_file():
    import socket
    import stat
    import struct

    from serve.capture import peer_uid

    store = CaptureStore(dim=4)
    folder = tempfile.mkdtemp()
    kept = os.path.join(folder, "notes.txt")
    with open(kept, "w") as f:
        f.write("mine")
    with pytest.raises(FileExistsError, match="not a socket"):
        serve_store(store, kept)
    assert open(kept).read() == "mine"
    path = os.path.join(folder, "c.sock")
    server = serve_store(store, path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            assert peer_uid(sock) == os.getuid()
            sock.sendall(struct.pack("<Q", 1 << 40))  # announces a terabyte header: refused, nothing allocated
            sock.settimeout(10)
            (n,) = struct.unpack("<Q", sock.recv(8))
            assert b"over the" in sock.recv(n)
        assert CaptureClient(path).ping()  # the server still answers
    finally:
        server.shutdown()
        server.server_close()


# -- matching and the backend -------------------------------------------------------------------------------------
def test_match_capture_needs_every_fed_token_and_never_invents_a_read_row():
    item = Captured("r", np.array([1, 10, 11, 12]), _rows(4))  # the 5th token (13) was generated, never fed
    rows = match_capture([1, 10, 11, 12, 13], [item])
    np.testing.assert_array_equal(rows[:4], _rows(4))
    np.testing.assert_array_equal(rows[4], rows[3])  # the last row is never read by a score
    np.testing.assert_array_equal(match_capture([1, 10, 11, 12], [item]), _rows(4))  # its last token was fed
    assert match_capture([1, 10, 99, 12, 13], [item]) is None  # another text
    assert match_capture([1, 10, 11, 12, 13, 14, 15], [item]) is None  # longer than what was recorded
    assert match_capture([1], [item]) is None
    other = Captured("r0", np.array([1, 10, 50]), _rows(3))
    np.testing.assert_array_equal(match_capture([1, 10, 11, 12], [other, item]), _rows(4))  # n > 1: the right one


class _FakeClient:
    path = "fake"

    def __init__(self, found):
        self.found, self.calls = found, []

    def fetch(self, keys, release=True):
        self.calls.append((sorted(keys), release))
        return {k: self.found.get(k, []) for k in keys}


class _Fallback:
    def __init__(self):
        self.seen = []

    def hidden_states(self, seqs):
        self.seen += seqs
        return [np.full((len(s), 4), -1.0, np.float32) for s in seqs]

    def close(self):
        pass


def test_capture_backend_falls_back_for_what_was_not_recorded():
    client = _FakeClient({"k": [Captured("r", np.array([1, 2, 3]), _rows(3))]})
    fallback = _Fallback()
    backend = CaptureBackend(client, fallback)
    seqs = [[1, 2, 3, 4], [1, 2, 9, 4], [7, 8]]
    out = backend.hidden_states(seqs, [("k", False), ("k", True), None])
    np.testing.assert_array_equal(out[0][:3], _rows(3))
    assert (out[1] == -1).all() and (out[2] == -1).all()  # another text under the key, and no key at all
    assert fallback.seen == [[1, 2, 9, 4], [7, 8]] and (backend.captured, backend.fell_back) == (1, 2)
    assert client.calls == [(["k"], False), (["k"], True)]  # released only after every read

    class Down(_FakeClient):
        def fetch(self, keys, release=True):
            raise ConnectionRefusedError("no plugin")

    with pytest.raises(BackendError, match="capture plugin did not answer"):
        CaptureBackend(Down({}), fallback).hidden_states([[1, 2]], [("k", True)])


def test_take_token_ids_from_completions_and_chat_responses():
    body = {"choices": [{"index": 0, "text": "a", "prompt_token_ids": [1, 5], "token_ids": [7, 8]}]}
    ids, changed = take_token_ids(body, keep=False)
    assert ids == {0: ([1, 5], [7, 8])} and changed and "token_ids" not in body["choices"][0]
    chat = {"prompt_token_ids": [1, 6], "choices": [{"index": 1, "delta": {"content": "x"}, "token_ids": [9]}]}
    ids, changed = take_token_ids(chat, keep=True)
    assert ids == {1: ([1, 6], [9])} and not changed and chat["prompt_token_ids"] == [1, 6]
    assert take_token_ids({"choices": [{"index": 0, "text": "a"}]}, keep=False) == ({0: (None, None)}, False)


# -- the plugin inside a real vLLM server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_scorer(tiny_vllm):
    from serve.scoring import Scorer

    return Scorer.from_export(tiny_vllm[1], backend="hf")


@pytest.mark.slow
def test_plugin_records_the_hook_layer_states_that_transformers_computes(tiny_vllm, tiny_capture_socket):
    import torch

    from atu.export import load_export
    from atu.hidden import hidden_at
    from atu.loading import load_lm

    base, export = tiny_vllm
    body = {"model": TINY_MODEL_NAME, "prompt": "Where was the first person born?", "max_tokens": 12,
            "temperature": 0, "return_token_ids": True}  # fmt: skip
    status, _, plain = http(base + "/v1/completions", body)  # not marked: not recorded
    status, _, marked = http(base + "/v1/completions", {**body, "vllm_xargs": {XARG: "t1"}})
    assert status == 200 and plain["choices"][0]["text"] == marked["choices"][0]["text"]
    client = CaptureClient(tiny_capture_socket)
    (got,) = client.fetch(["t1"])["t1"]
    choice = marked["choices"][0]
    fed = choice["prompt_token_ids"] + choice["token_ids"][:-1]  # the last generated token is never fed back
    assert got.ids.tolist() == fed
    layer = load_export(export).guard.hook_layer
    model, _ = load_lm(export / "model", device="cpu", dtype="float32")
    ids = torch.tensor([fed])
    with torch.inference_mode():
        want = hidden_at(model, ids, torch.ones_like(ids), layer)[0].numpy()
    np.testing.assert_allclose(got.rows, want, atol=1e-4, rtol=1e-4)
    assert client.fetch(["t1"])["t1"] == []  # released by the first fetch


@pytest.mark.slow
def test_plugin_records_marked_requests_sharing_steps_with_unmarked_ones(tiny_vllm, tiny_capture_socket, tiny_world):
    """Requests in flight together share each forward; only the marked ones' rows are kept, each in its place."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from atu.export import load_export
    from atu.hidden import hidden_at
    from atu.loading import load_lm

    base, export = tiny_vllm
    names = tiny_world.concepts().names()

    def ask(i):
        body = {"model": TINY_MODEL_NAME, "prompt": f"Where was {names[i % len(names)]} born? " * (1 + i % 3),
                "max_tokens": 10, "temperature": 0, "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        if i % 2:
            body["vllm_xargs"] = {XARG: f"mixed{i}"}
        return i, http(base + "/v1/completions", body)[2]["choices"][0]

    with ThreadPoolExecutor(8) as pool:
        answers = dict(pool.map(ask, range(8)))
    client = CaptureClient(tiny_capture_socket)
    got = client.fetch([f"mixed{i}" for i in range(8)])
    assert all(got[f"mixed{i}"] == [] for i in range(0, 8, 2))  # unmarked: nothing kept
    model, _ = load_lm(export / "model", device="cpu", dtype="float32")
    layer = load_export(export).guard.hook_layer
    for i in range(1, 8, 2):
        (rec,) = got[f"mixed{i}"]
        fed = answers[i]["prompt_token_ids"] + answers[i]["token_ids"][:-1]
        assert rec.ids.tolist() == fed
        ids = torch.tensor([fed])
        with torch.inference_mode():
            want = hidden_at(model, ids, torch.ones_like(ids), layer)[0].numpy()
        np.testing.assert_allclose(rec.rows, want, atol=1e-4, rtol=1e-4)
    client.fetch([], release=False)
    assert client.stored == 0


@pytest.mark.slow
def test_guard_with_capture_scores_like_transformers(tiny_vllm, tiny_capture_socket, hf_scorer, tiny_world):
    from serve.launch import close_guard, guard_in_thread, make_guard
    from serve.scoring import Capture
    from serve.settings import GuardSettings

    base, export = tiny_vllm
    settings = GuardSettings(upstream_url=base, port=0, disclose="full", operator_key="op")
    guard = make_guard(export, settings, backend="capture", capture_socket=tiny_capture_socket)
    names = tiny_world.concepts().names()
    try:
        with guard_in_thread(guard) as url:
            compared = 0
            for name in names[:2]:
                prompt = f"Where was {name} born?"
                body = {"model": TINY_MODEL_NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0}
                status, headers, got = http(url + "/v1/completions", body)
                assert status == 200 and "token_ids" not in got["choices"][0]  # not asked for: taken out
                _, _, ref = http(base + "/v1/completions", {**body, "return_token_ids": True})
                c = ref["choices"][0]
                same_ids = Capture("x", True, c["prompt_token_ids"], c["token_ids"])
                want = hf_scorer.score_batch([(prompt, c["text"])], [same_ids])[0]
                for part in ("prompt", "completion"):
                    by_concept = {s["concept"]: s["score"] for s in got["leakage"]["choices"][0][part]}
                    for s in getattr(want, part):
                        assert abs(by_concept[s.concept] - s.score) < 1e-3, (part, s.concept)
                        compared += 1
                # streamed: the same annotation, and no token ids the client did not ask for
                status, _, text = http(url + "/v1/completions", {**body, "stream": True})
                events = [e for e in sse_events(text) if isinstance(e, dict)]
                assert not any("token_ids" in (ch or {}) for e in events for ch in e.get("choices") or [])
                (note,) = [e for e in events if "leakage" in e]
                streamed = note["leakage"]["choices"][0]["completion"][0]
                assert abs(streamed["score"] - want.completion[0].score) < 1e-3
            status, _, chat = http(url + "/v1/chat/completions", {"model": TINY_MODEL_NAME, "max_tokens": 8,
                                   "messages": [{"role": "user", "content": f"Who is {names[0]}?"}],
                                   "return_token_ids": True})  # fmt: skip
            assert status == 200 and chat["choices"][0]["token_ids"]  # asked for: kept
            assert compared >= 4
            status, _, scored = http(url + "/v1/leakage", {"text": f"{names[0]} was born in a city."}, key="op")
            assert status == 200 and scored  # no generation behind it: scored by the fallback backend
            _, _, metrics = http(url + "/metrics", key="op")
            assert 'atu_guard_capture_sequences_total{result="captured"} 5.0' in metrics
            assert 'atu_guard_capture_sequences_total{result="fallback"} 1.0' in metrics
        backend = guard.scorer.backend
        assert backend.captured == 5 and backend.fell_back == 1  # 2 plain, 2 streamed, 1 chat; then /v1/leakage
        client = CaptureClient(tiny_capture_socket)
        client.fetch([], release=False)
        assert client.stored == 0  # every exchange's states were released once scored
    finally:
        close_guard(guard)


@pytest.mark.slow
def test_capture_backend_refuses_a_socket_without_the_plugin(tiny_vllm):
    from serve.scoring import Scorer

    with pytest.raises(BackendError, match="no capture plugin answers"):
        Scorer.from_export(tiny_vllm[1], backend="capture", capture_socket="/nonexistent/capture.sock")
    with pytest.raises(ValueError, match="needs capture_socket"):
        Scorer.from_export(tiny_vllm[1], backend="capture")


def test_plugin_register_is_inert_without_its_settings(monkeypatch):
    import sys

    from serve import capture

    monkeypatch.delenv("ATU_CAPTURE_LAYER", raising=False)
    monkeypatch.delenv("ATU_CAPTURE_SOCKET", raising=False)
    capture.register()  # vLLM calls it in every process: without the settings it must not touch vLLM
    runner = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    assert runner is None or "_atu_capture_patched" not in runner.GPUModelRunner.__dict__


def test_capture_settings_from_the_environment(monkeypatch):
    from atu.envs import capture_settings

    monkeypatch.delenv("ATU_CAPTURE_MAX_MIB", raising=False)
    monkeypatch.setenv("ATU_CAPTURE_LAYER", "2")
    monkeypatch.delenv("ATU_CAPTURE_SOCKET", raising=False)
    assert capture_settings() is None  # a layer without a socket: off
    monkeypatch.setenv("ATU_CAPTURE_SOCKET", "/tmp/x.sock")
    assert capture_settings() == (2, "/tmp/x.sock", 256 * 2**20)
    monkeypatch.setenv("ATU_CAPTURE_MAX_MIB", "0.5")
    assert capture_settings()[2] == 2**19


@pytest.mark.slow
def test_block_policy_streams_with_capture_and_releases_every_exchange(tiny_vllm, tiny_capture_socket, tiny_world):
    """Block holds a stream back and scores it every few chunks (states read, not released) and at the end."""
    from serve.launch import close_guard, guard_in_thread, make_guard
    from serve.settings import GuardSettings

    base, export = tiny_vllm
    settings = GuardSettings(upstream_url=base, port=0, policy="block", stream_score_every=2)
    guard = make_guard(export, settings, backend="capture", capture_socket=tiny_capture_socket)
    name = tiny_world.concepts().names()[1]
    try:
        with guard_in_thread(guard) as url:
            body = {"model": TINY_MODEL_NAME, "prompt": f"Where was {name} born?", "max_tokens": 12,
                    "temperature": 0, "stream": True}  # fmt: skip
            status, _, text = http(url + "/v1/completions", body)
            events = [e for e in sse_events(text) if isinstance(e, dict)]
            (note,) = [e for e in events if "leakage" in e]
            streamed = "".join(ch.get("text") or "" for e in events for ch in e.get("choices") or [])
            _, _, plain = http(base + "/v1/completions", {**body, "stream": False})
            assert status == 200 and note["leakage"]["action"] == "passed"
            assert streamed == plain["choices"][0]["text"]  # nothing lost or added by the holding back
            status, _, two = http(url + "/v1/completions", {**body, "stream": False, "n": 2, "temperature": 1.0})
            assert status == 200 and len(two["leakage"]["choices"]) == 2
        backend = guard.scorer.backend
        assert backend.fell_back == 0 and backend.captured >= 3  # several partial scores, the final one, n=2
        client = CaptureClient(tiny_capture_socket)
        client.fetch([], release=False)
        assert client.stored == 0
    finally:
        close_guard(guard)
