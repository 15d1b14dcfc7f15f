"""Hidden-state backends for the guard: token ids in, the hook layer's per-token states out.

Every backend is a ``StateBackend``: ``hidden_states(list_of_token_id_lists, captures=None) -> list[np.ndarray
(T_i, H)]``, float32, one array per sequence, row ``t`` the state after the first ``L`` decoder layers at token
``t``. Backends may return the states at any positive scale per token (vLLM returns them L2-normalised): the
predictor L2-normalises its input, so its output does not change. ``captures`` matters only to a backend that
``uses_captures``; so do ``capture_status`` and ``release``. ``make_backend`` builds any of them for an export.

- ``HFBackend``: transformers, any device; the export's model with the decoder layers above ``L`` dropped, run
  through ``atu.hidden.hidden_at`` in right-padded batches. A stream scored as it grows (``stream_states``) keeps
  its keys and values, so each of its scorings runs the model over its new tokens only.
- ``VLLMPoolingBackend``: a real vLLM server started with the pooling runner over a probe export (see
  ``serve.pooling_model``); it holds only layers ``0..L-1`` and answers ``POST /pooling`` with one vector per token.
- ``CaptureBackend``: the states vLLM computed while it generated, recorded by the in-engine capture plugin
  (``serve.capture``) under a key the guard gave the request; texts with no capture (``/v1/leakage``, a
  completion whose re-tokenisation differs from the generated tokens) go to a fallback backend.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from atu.errors import AtuError
from atu.hidden import check_hook_layer, decoder_layers, hidden_at
from atu.loading import load_lm
from atu.texts import common_prefix
from serve.stream_cache import StreamCache

if TYPE_CHECKING:
    from atu.export import Export

logger = logging.getLogger(__name__)

MAX_BATCH_TOKENS = 16_384  # padded tokens per forward pass of the HF backend; bounds activation memory
STREAM_CACHE_BYTES = 256 << 20  # the HF backend's keys and values of streams kept between scorings (LRU beyond)


class BackendError(AtuError):
    """A hidden-state backend failed: the vLLM pooling server is unreachable, slow, or answered an error."""


def check_id_lists(sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    """Validate a batch of token id lists: a list of non-empty lists of non-negative ints."""
    if not isinstance(sequences, (list, tuple)):
        raise ValueError(f"expected a list of token id lists, got {type(sequences).__name__}.")
    out = []
    for i, seq in enumerate(sequences):
        if not isinstance(seq, (list, tuple)) or not seq:
            raise ValueError(f"sequence {i} must be a non-empty list of token ids, got {seq!r:.80}.")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in seq):
            raise ValueError(f"sequence {i} must hold non-negative int token ids, got {list(seq)!r:.80}.")
        out.append([int(t) for t in seq])
    return out


def length_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size (B x longest) stays <= ``max_tokens``.

    Sorting by length keeps padding small; a sequence longer than ``max_tokens`` gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[i] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class StateBackend:
    """What the scorer and the guard may ask of a backend; the defaults are those of a backend without captures."""

    uses_captures = False  # hidden_states reads the captures it is given (and counts them to ``listener``)
    listener = None  # called with (captured, fell back) after each call, e.g. to count them in metrics

    def hidden_states(self, sequences: Sequence[Sequence[int]], captures=None) -> list[np.ndarray]:
        raise NotImplementedError

    def stream_states(self, key: str, ids: Sequence[int], final: bool = False) -> np.ndarray:
        """(T, H) states of one stream's sequence ``ids``, scored before under ``key``: a backend that can reuse its
        work on the tokens the stream already had does so (``final``: the last call for ``key``)."""
        return self.hidden_states([ids])[0]

    def capture_status(self) -> str | None:
        """None without a capture plugin; else "ok" or why the plugin does not answer (blocking: run off-loop)."""
        return None

    def release(self, key: str) -> None:
        """Let the capture plugin forget the states recorded under ``key`` (blocking)."""

    def close(self) -> None:
        pass


class HFBackend(StateBackend):
    """Layer-``layer`` states from a transformers causal LM (float32 on CPU; the model's dtype elsewhere)."""

    def __init__(
        self, model_dir: str | Path, layer: int, device: str = "cpu", *, max_batch_tokens: int = MAX_BATCH_TOKENS
    ):
        model, _ = load_lm(model_dir, device=device, dtype="float32" if device == "cpu" else None)
        check_hook_layer(model, layer)
        del decoder_layers(model)[layer:]  # never run (hidden_at stops at `layer`); frees their memory
        self._attach(model, layer, max_batch_tokens)

    @classmethod
    def from_model(cls, model, layer: int, *, max_batch_tokens: int = MAX_BATCH_TOKENS) -> HFBackend:
        """A backend over a model already in memory (left whole: the caller may still use its upper layers)."""
        check_hook_layer(model, layer)
        backend = cls.__new__(cls)
        backend._attach(model, layer, max_batch_tokens)
        return backend

    def _attach(self, model, layer: int, max_batch_tokens: int) -> None:
        self.model, self.layer, self.device = model, layer, next(model.parameters()).device
        self.hidden_size = int(model.config.hidden_size)
        self.max_batch_tokens = max_batch_tokens
        self._streams = StreamCache(STREAM_CACHE_BYTES)  # (ids, transformers cache, states) by stream key
        self.tokens_run = 0  # tokens the model ran over, over all calls

    def hidden_states(self, sequences: Sequence[Sequence[int]], captures=None) -> list[np.ndarray]:
        """(T_i, H) float32 states for each id list, batched with right padding."""
        seqs = check_id_lists(sequences)
        out: list[np.ndarray | None] = [None] * len(seqs)
        for batch in length_batches([len(s) for s in seqs], self.max_batch_tokens):
            width = max(len(seqs[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, : len(seqs[i])] = 1
            with torch.inference_mode():
                hidden = hidden_at(self.model, ids.to(self.device), mask.to(self.device), self.layer)  # (B, T, H)
            hidden = hidden.float().cpu().numpy()
            self.tokens_run += sum(len(seqs[i]) for i in batch)
            for row, i in enumerate(batch):
                out[i] = hidden[row, : len(seqs[i])]
        return out  # type: ignore[return-value]

    def stream_states(self, key: str, ids: Sequence[int], final: bool = False) -> np.ndarray:
        from transformers import DynamicCache

        ids = check_id_lists([ids])[0]
        old_ids, cache, old = self._streams.pop(key) or ([], DynamicCache(), np.zeros((0, self.hidden_size)))
        shared = common_prefix(old_ids, ids)
        if shared == len(ids):  # nothing new; the model must still run over one token to give a state
            shared -= 1
        if cache.get_seq_length() > shared:
            cache.crop(shared - cache.get_seq_length())  # drop what changed (a word cut at the end, re-tokenised)
        new = torch.tensor([ids[shared:]], device=self.device)
        mask = torch.ones((1, len(ids)), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = hidden_at(self.model, new, mask, self.layer, past_key_values=cache)[0].float().cpu().numpy()
        self.tokens_run += len(ids) - shared
        states = np.concatenate([old[:shared], hidden]).astype(np.float32, copy=False)
        if not final:
            layers = getattr(cache, "layers", [])
            kv = sum(t.numel() * t.element_size() for la in layers for t in (la.keys, la.values) if t is not None)
            self._streams.put(key, (ids, cache, states), kv + states.nbytes)
        return states

    @property
    def cached_streams(self) -> int:
        """How many streams' keys and values are kept."""
        return len(self._streams)


class VLLMPoolingBackend(StateBackend):
    """Layer-``L`` states from a vLLM pooling server over a probe export (``serve.pooling_model.pooling_server``).

    Request (vLLM 0.32 ``POST /pooling``, ``PoolingCompletionRequest``)::

        {"model": NAME, "input": [[ids...], ...], "task": "token_embed", "add_special_tokens": false,
         "encoding_format": "base64", "embed_dtype": "float32", "endianness": "little"}

    Response: ``{"data": [{"index": i, "data": BASE64}, ...], ...}``, each item the (T_i * H) little-endian float32
    values of one input, row-major, L2-normalised per token. Token ids are sent, not text, so the tokenisation is
    exactly the scorer's.
    """

    def __init__(self, base_url: str, model_name: str = "atu-probe", timeout: float = 30.0, *, hidden_size=None):
        self.base_url = base_url.rstrip("/")
        self.model_name, self.timeout, self.hidden_size = model_name, float(timeout), hidden_size

    def _post(self, body: dict) -> dict:
        req = urllib.request.Request(
            self.base_url + "/pooling", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise BackendError(f"vLLM pooling server {self.base_url} answered {err.code}: {detail}") from err
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            raise BackendError(
                f"vLLM pooling server {self.base_url} unreachable or slower than {self.timeout:.0f}s ({err}); "
                "start it with serve.pooling_model.pooling_server or use backend='hf'."
            ) from err

    def hidden_states(self, sequences: Sequence[Sequence[int]], captures=None) -> list[np.ndarray]:
        """(T_i, H) float32 unit-norm states for each id list, in one request."""
        seqs = check_id_lists(sequences)
        if not seqs:
            return []
        body = {
            "model": self.model_name,
            "input": seqs,
            "task": "token_embed",
            "add_special_tokens": False,
            "encoding_format": "base64",
            "embed_dtype": "float32",
            "endianness": "little",
        }
        items = sorted(self._post(body).get("data") or [], key=lambda d: d.get("index", 0))
        if len(items) != len(seqs):
            raise BackendError(f"vLLM pooling server returned {len(items)} results for {len(seqs)} inputs.")
        out = []
        for seq, item in zip(seqs, items):
            flat = np.frombuffer(bytearray(base64.b64decode(item["data"])), dtype="<f4")  # writable, for torch
            if flat.size % len(seq) or (self.hidden_size and flat.size != len(seq) * self.hidden_size):
                raise BackendError(
                    f"vLLM pooling server returned {flat.size} values for {len(seq)} tokens"
                    + (f" of width {self.hidden_size}" if self.hidden_size else "")
                    + "; is it serving the probe export of this model with task token_embed?"
                )
            out.append(flat.reshape(len(seq), -1).astype(np.float32, copy=False))
        return out


class CaptureBackend(StateBackend):
    """States recorded during generation by the in-engine capture plugin, with a fallback backend.

    ``hidden_states(sequences, captures)``: ``captures[i]`` is ``(key, release)`` for a sequence that a marked
    request produced, or None. A recorded request under ``key`` serves sequence ``i`` when its fed tokens equal
    the sequence's but its last (whose row is never read: a completion's last token predicts nothing the scorer
    uses, and the predictor is causal, so that row changes no other). Everything else goes to ``fallback``.
    """

    uses_captures = True

    def __init__(self, client, fallback) -> None:
        self.client, self.fallback = client, fallback
        self.captured = 0  # sequences served from the capture
        self.fell_back = 0  # sequences sent to the fallback backend

    def hidden_states(self, sequences: Sequence[Sequence[int]], captures=None) -> list[np.ndarray]:
        seqs = check_id_lists(sequences)
        captures = list(captures) if captures is not None else [None] * len(seqs)
        if len(captures) != len(seqs):
            raise ValueError(f"got {len(captures)} captures for {len(seqs)} sequences.")
        found: dict[str, list] = {}
        for release in (False, True):  # one fetch per kind; a key asked both ways is released after it is read
            keys = sorted({c[0] for c in captures if c is not None and bool(c[1]) == release})
            if keys:
                try:
                    for key, items in self.client.fetch(keys, release=release).items():
                        found.setdefault(key, []).extend(items)
                except OSError as e:
                    raise BackendError(f"the capture plugin did not answer on {self.client.path} ({e})") from e
        out: list[np.ndarray | None] = [None] * len(seqs)
        for i, (seq, cap) in enumerate(zip(seqs, captures)):
            if cap is not None:
                out[i] = match_capture(seq, found.get(cap[0], []))
        missing = [i for i, h in enumerate(out) if h is None]
        self.captured += len(seqs) - len(missing)
        self.fell_back += len(missing)
        if self.listener is not None:
            self.listener(len(seqs) - len(missing), len(missing))
        if missing:
            for i, h in zip(missing, self.fallback.hidden_states([seqs[i] for i in missing])):
                out[i] = h
        return out  # type: ignore[return-value]

    def stream_states(self, key: str, ids: Sequence[int], final: bool = False) -> np.ndarray:
        """A stream that vLLM's capture does not hold (the guard marks every request it sends, so rarely)."""
        self.fell_back += 1
        return self.fallback.stream_states(key, ids, final)

    def capture_status(self) -> str:
        return "ok" if self.client.ping() else f"no answer on {self.client.path}"

    def release(self, key: str) -> None:
        self.client.fetch([key], True)

    def close(self) -> None:
        self.fallback.close()


def match_capture(seq: Sequence[int], items) -> np.ndarray | None:
    """(T, H) rows for ``seq`` from the first recorded request whose fed tokens cover ``seq[:-1]``, or None.

    Row ``T-1`` (the last token's) is recorded only when the engine fed that token; otherwise it repeats row
    ``T-2``, which no score reads (see ``CaptureBackend``)."""
    need = len(seq) - 1
    if need < 1:
        return None
    head = np.asarray(seq[:need], dtype=np.int64)
    for item in items:
        if len(item.ids) >= need and np.array_equal(item.ids[:need], head):
            rows = item.rows[: need + 1] if len(item.ids) > need and item.ids[need] == seq[-1] else None
            if rows is None:
                rows = np.concatenate([item.rows[:need], item.rows[need - 1 : need]])
            return np.ascontiguousarray(rows, dtype=np.float32)
    return None


BACKENDS = ("hf", "vllm", "capture")


def make_backend(
    kind: str,
    export: Export,
    resources: ExitStack,
    *,
    max_tokens: int,
    device: str = "cpu",
    pooling_url: str | None = None,
    capture_socket: str | None = None,
    timeout: float = 30.0,
) -> StateBackend:
    """The backend ``kind`` (one of ``BACKENDS``) for ``export``; a server it starts is stopped by ``resources``.

    ``hf`` loads the model (layers above the hook layer dropped) on ``device``. ``vllm`` reads states from a vLLM
    pooling server over the export's probe: the one at ``pooling_url``, or, when it is None, one started here.
    ``capture`` reads the states the capture plugin recorded in the vLLM that generates, over ``capture_socket``;
    what was not recorded goes to an ``hf`` backend."""
    if kind not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {kind!r}.")
    if kind == "vllm":
        if pooling_url is None:
            from serve.pooling_model import pooling_server, probe_export

            pooling_url = resources.enter_context(pooling_server(probe_export(export.root), max_model_len=max_tokens))
        return VLLMPoolingBackend(pooling_url, timeout=timeout, hidden_size=export.guard.hidden_size)
    states = HFBackend(export.model_dir, export.guard.hook_layer, device)
    if kind == "hf":
        return states
    client = capture_client(capture_socket, timeout)
    if (client.layer, client.dim) != (export.guard.hook_layer, export.guard.hidden_size):
        raise BackendError(
            f"the capture plugin on {capture_socket} records layer {client.layer} of width {client.dim}; this export "
            f"needs layer {export.guard.hook_layer} of width {export.guard.hidden_size}. Is that vLLM serving this "
            "export?"
        )
    return CaptureBackend(client, states)


def capture_client(path: str | None, timeout: float):
    """A client of the capture plugin answering on ``path``; BackendError when none answers."""
    from serve.capture import CaptureClient

    if not path:
        raise ValueError(
            "backend 'capture' needs capture_socket: the socket of a vLLM server started with the plugin."
        )
    client = CaptureClient(path, timeout=timeout)
    if not client.ping():
        raise BackendError(
            f"no capture plugin answers on {path}; start vLLM with ATU_CAPTURE_LAYER and ATU_CAPTURE_SOCKET set "
            "(atu serve does) or use backend 'hf'."
        )
    return client
