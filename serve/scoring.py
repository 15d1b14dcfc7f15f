"""Leakage scoring: hidden states at the hook layer, the predictor, cosine to every concept of the export's index.

For a prompt and its completion the scored sequence is::

    ids = [BOS] + tokenizer(prompt, add_special_tokens=False) + tokenizer(completion, add_special_tokens=False)

BOS is prepended only when the tokenizer has one and the prompt's own tokens do not already start with it (a
chat prompt rendered by the world tokenizer's template starts with the BOS text, which tokenises to BOS). That
leading BOS is the *prefix*: its state is the same for every text, so it is never scored, and truncation keeps it.

Predictor row ``t`` reads the states of tokens ``0..t`` and predicts the embedding of the text *after* token
``t``, i.e. the window starting at token ``t + 1``. A part (prompt or completion) is scored on the rows whose
window starts inside it: the prompt on ``t + 1`` in its tokens, the completion from the last prompt token up to
its own second-to-last token (its last token predicts text after the completion, which does not exist). A
concept's score in a part is its highest cosine over those rows (``ConceptIndex.concept_scores``).

A score's ``position`` is the index, in that part's own tokens (``tokenizer(part, add_special_tokens=False)``,
whatever was truncated), of the token where the predicted window starts; its ``span``/``excerpt`` is the text
from there, about ``EXCERPT_CHARS`` characters, clipped to the part. Too long a sequence (over the predictor's
``max_len`` or the model's ``max_position_embeddings``) loses its oldest prompt tokens first, then its oldest
completion tokens; the report says so (``truncated``).
"""

from __future__ import annotations

import json
import logging
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from atu.export import load_export
from atu.index import ConceptIndex
from atu.predictor import EmbeddingPredictor
from atu.predictor_cache import PrefixState, extend_batch
from serve.backends import BACKENDS, make_backend
from serve.names import NameMatcher
from serve.stream_cache import StreamCache

logger = logging.getLogger(__name__)

EXCERPT_CHARS = 80
# Scoring only what follows ``since`` characters: the windows starting this far before it are scored again, since
# the tokens of a word cut at the end of the text scored before may change once the rest of the word arrives.
RESCORE_CHARS = 64
# The predictor's work on the streams being scored, kept between their scorings (least recently used dropped first):
# about 3.5 KB a token with the default predictor, so this holds some 18,000 tokens of streams.
STREAM_CACHE_BYTES = 64 << 20
_ARGSORT_MAX = 4096  # above this many concepts, the top_k are found by partition rather than a full sort


# ---------------------------------------------------------------------------------------------- pure helpers


def truncation(n_prefix: int, n_prompt: int, n_completion: int, max_tokens: int) -> tuple[int, int]:
    """(prompt tokens, completion tokens) to drop from the start so the sequence fits in ``max_tokens``."""
    if max_tokens <= n_prefix:
        raise ValueError(f"max_tokens ({max_tokens}) must exceed the prefix length ({n_prefix}).")
    excess = max(0, n_prefix + n_prompt + n_completion - max_tokens)
    drop_prompt = min(excess, n_prompt)
    return drop_prompt, excess - drop_prompt


def part_rows(n_prefix: int, n_prompt: int, n_completion: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictor rows that score the prompt and the completion of ``[prefix][prompt][completion]``.

    Row ``t`` predicts the window starting at token ``t + 1``. Prompt rows: ``t + 1`` in the prompt's tokens;
    completion rows: ``t + 1`` in the completion's tokens but its last (``t`` from the last prompt token to the
    second-to-last completion token). Prefix rows (BOS) are never scored. Returns two int64 arrays (ascending).
    """
    a, b = n_prefix, n_prefix + n_prompt
    end = b + n_completion
    prompt = np.arange(max(n_prefix, a - 1), b - 1, dtype=np.int64)
    completion = np.arange(max(n_prefix, b - 1), end - 1, dtype=np.int64)
    return prompt, completion


def window_char_starts(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Character where the window starting at token ``positions[i]`` begins, in the part's text (N,) int64.

    That is the end of the text before it: the running maximum of the ends of tokens ``0..p-1`` (byte-level
    tokens of one multi-byte character report overlapping offsets; the running maximum never moves back), or
    0 for ``p = 0``. ``offsets`` (n, 2) are the part's ``[start, end)`` character offsets; ``0 <= p < n``.
    """
    positions = np.asarray(positions, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if positions.size and (positions.min() < 0 or positions.max() >= len(offsets)):
        raise ValueError(f"positions must be in [0, {len(offsets)}), got {positions.tolist()!s:.120}.")
    ends = np.maximum.accumulate(offsets[:, 1]) if len(offsets) else offsets[:, 1]
    return np.where(positions > 0, ends[np.maximum(positions - 1, 0)] if len(ends) else 0, 0)


def excerpt_span(text: str, start: int, width: int = EXCERPT_CHARS) -> tuple[int, int]:
    """``[start, end)`` of about ``width`` characters of ``text`` from ``start``, leading whitespace skipped."""
    start = min(max(int(start), 0), len(text))
    while start < len(text) and text[start].isspace():
        start += 1
    return start, min(len(text), start + width)


# ---------------------------------------------------------------------------------------------- results


@dataclass
class ConceptScore:
    """One concept in one part (prompt or completion)."""

    concept: str
    score: float  # highest cosine over the part's rows; -1.0 when the part has none
    threshold: float
    flagged: bool  # score > threshold, or the concept's name is written in the part
    position: int  # token index, in the part's tokens, where the best-scoring window starts (-1 if none)
    span: tuple[int, int]  # [start, end) characters of the excerpt in the part's text
    excerpt: str  # the text the window predicted (about EXCERPT_CHARS characters)
    row: int = -1  # predictor row (token index in the scored sequence) that reached the score; -1 if none
    named: bool = False  # the concept's name is written in the part (the excerpt then starts at it)

    def to_dict(self) -> dict:
        # written out, not dataclasses.asdict: every report of every exchange goes through here, and asdict's
        # recursive copy was a few percent of the guard's time under load
        return {
            "concept": self.concept,
            "score": self.score,
            "threshold": self.threshold,
            "flagged": self.flagged,
            "position": self.position,
            "span": list(self.span),
            "excerpt": self.excerpt,
            "row": self.row,
            "named": self.named,
        }


@dataclass
class LeakageReport:
    prompt: list[ConceptScore]  # every concept (or the top_k highest), score descending
    completion: list[ConceptScore]
    flagged: list[str]  # concepts flagged in the completion, score descending
    prompt_flagged: list[str]  # concepts flagged in the prompt, score descending
    max_score: float  # highest completion score over all concepts; -1.0 for an empty completion
    truncated: bool = False  # oldest tokens were dropped to fit the predictor / model length
    n_tokens: int = 0  # tokens in the scored sequence (after truncation)

    def to_dict(self) -> dict:
        """JSON-safe dict with stable keys."""
        return {
            "completion": [s.to_dict() for s in self.completion],
            "flagged": list(self.flagged),
            "max_score": float(self.max_score),
            "n_tokens": int(self.n_tokens),
            "prompt": [s.to_dict() for s in self.prompt],
            "prompt_flagged": list(self.prompt_flagged),
            "truncated": bool(self.truncated),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)


@dataclass
class Capture:
    """How the capture backend finds one exchange's states, and the tokens vLLM really used.

    ``key``: what the request was marked with (``vllm_xargs``); ``release``: the plugin may forget the states once
    read (the last scoring of the exchange). ``prompt_ids``/``completion_ids``: vLLM's own token ids
    (``return_token_ids``); when given, the scorer scores them instead of re-tokenising the text, so that special
    tokens and non-canonical tokenisations are scored as generated."""

    key: str
    release: bool = True
    prompt_ids: list[int] | None = None
    completion_ids: list[int] | None = None


@dataclass(frozen=True)
class Resume:
    """Pair ``i`` continues a stream that was scored before under ``key``: the predictor's rows of the tokens it
    shares with that scoring are reused, so a stream scored as it grows costs one predictor row per new token.

    ``chars``: None (score everything), or how much of the completion a clean score covered (only what follows is
    scored, as with an int ``since``). ``final``: the stream's last scoring; its cached work is dropped."""

    key: str
    chars: int | None = None
    final: bool = False


@dataclass
class _Part:
    text: str
    offsets: np.ndarray | None  # (n, 2) of the part's own tokens; None: ``ids`` came from vLLM, decode them
    base: int  # index in the part's tokens of its first token in the scored sequence
    first_row: int  # sequence index of that token
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # predictor rows scoring the part
    ids: list[int] = field(default_factory=list)  # the part's own tokens (decoded for spans when offsets is None)
    names_from: int = 0  # character where the search for concept names starts (text before it was searched)


@dataclass
class _Item:
    ids: list[int]
    prompt: _Part
    completion: _Part
    truncated: bool


# ---------------------------------------------------------------------------------------------- the scorer


class Scorer:
    """Scores prompt/completion pairs against the concepts of an export. Build with ``Scorer.from_export``.

    ``score_batch`` is blocking; calls are serialised by a lock, so one worker thread (or several) may call it.
    """

    def __init__(
        self,
        backend,
        tokenizer,
        predictor: EmbeddingPredictor,
        index: ConceptIndex,
        *,
        max_tokens: int,
        top_k: int | None = 5,
        resources: ExitStack | None = None,
        names: NameMatcher | None = None,
    ):
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None (every concept), got {top_k!r}.")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"max_tokens must be an int >= 2, got {max_tokens!r}.")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the scorer needs a fast tokenizer (character offsets); load it with use_fast=True.")
        self.backend, self.tokenizer, self.predictor, self.index = backend, tokenizer, predictor.eval(), index
        self.max_tokens, self.top_k, self.excerpt_chars = max_tokens, top_k, EXCERPT_CHARS
        self.names = names  # concept names written out also flag (serve/names.py); None: the predictor alone
        self._resources = resources or ExitStack()
        self._lock = threading.Lock()
        self.rows_scored = 0  # predictor rows compared with the concepts, over all calls
        self.rows_predicted = 0  # predictor rows computed, over all calls
        self._streams = StreamCache(STREAM_CACHE_BYTES)  # PrefixState by Resume.key

    # -- what the guard asks of the backend

    @property
    def uses_captures(self) -> bool:
        """Whether the backend reads the states vLLM's capture plugin recorded (requests are marked for it)."""
        return self.backend.uses_captures

    def capture_status(self) -> str | None:
        """None without a capture plugin; else "ok" or why it does not answer (blocking)."""
        return self.backend.capture_status()

    def release(self, key: str) -> None:
        """Let the capture plugin forget the states of a request whose last scoring did not read them (blocking)."""
        self.backend.release(key)

    def count_captures(self, listener) -> None:
        """Call ``listener(captured, fell_back)`` after each backend call that reads captures."""
        self.backend.listener = listener

    @property
    def cached_streams(self) -> int:
        """How many streams' predictor work is kept for their next scoring."""
        return len(self._streams)

    @property
    def labels(self) -> list[str]:
        return list(self.index.labels)

    @property
    def thresholds(self) -> np.ndarray:
        return self.index.thresholds

    @classmethod
    def from_export(
        cls,
        export_dir: str | Path,
        backend: str = "hf",
        device: str = "cpu",
        pooling_url: str | None = None,
        top_k: int | None = 5,
        timeout: float = 30.0,
        capture_socket: str | None = None,
        match_names: bool = True,
    ) -> Scorer:
        """A scorer over the export at ``export_dir``.

        ``backend="hf"`` loads the model (layers above the hook layer dropped) on ``device``. ``backend="vllm"``
        reads states from a vLLM pooling server over the export's probe: the one at ``pooling_url``, or, when it is
        None, one this scorer starts (``serve.pooling_model.pooling_server``) and owns: ``close()`` stops it.
        ``backend="capture"`` reads the states that the capture plugin (``serve.capture``) recorded in the vLLM
        server generating the answers, over ``capture_socket``; what was not recorded goes to an ``hf`` backend.
        ``match_names``: a concept whose name is written in a part is flagged there whatever its score.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        export = load_export(export_dir)
        model_cfg = json.loads((export.model_dir / "config.json").read_text())
        max_tokens = min(export.predictor.config.max_len, int(model_cfg.get("max_position_embeddings") or 1 << 30))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(export.model_dir))
        with ExitStack() as resources:  # handed to the scorer on success, closed (server stopped) on failure
            states = make_backend(backend, export, resources, max_tokens=max_tokens, device=device,
                                  pooling_url=pooling_url, capture_socket=capture_socket, timeout=timeout)  # fmt: skip
            names = NameMatcher(export.index.labels) if match_names else None
            scorer = cls(states, tokenizer, export.predictor, export.index, max_tokens=max_tokens, top_k=top_k,
                         resources=resources.pop_all(), names=names)  # fmt: skip
        return scorer

    def close(self) -> None:
        """Release the backend and any server this scorer started."""
        self.backend.close()
        self._resources.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public scoring

    def score(self, prompt: str, completion: str) -> LeakageReport:
        return self.score_batch([(prompt, completion)])[0]

    def score_text(self, text: str) -> LeakageReport:
        """The whole ``text`` scored as a completion of an empty prompt."""
        return self.score_batch([("", text)])[0]

    def score_batch(self, pairs: list[tuple[str, str]], captures=None, since=None) -> list[LeakageReport]:
        """One report per ``(prompt, completion)``; one backend call and one predictor pass for the batch.

        ``captures[i]``: a ``Capture`` when pair ``i`` came from a vLLM request marked for the capture plugin (its
        token ids, when given, are scored instead of the re-tokenised text, with any backend), else None.
        ``since[i]``: None (score everything), or the length of a start of the completion scored before: then only
        the completion's windows from about there on are scored (see ``RESCORE_CHARS``) and not the prompt's, so a
        stream scored as it grows compares each window with the concepts about once. The predictor is causal: a
        window's score does not change when text is added after it. A ``Resume`` does the same and also reuses the
        predictor's rows of the stream's last scoring."""
        if not isinstance(pairs, (list, tuple)):
            raise ValueError(f"pairs must be a list of (prompt, completion) str tuples, got {type(pairs).__name__}.")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
                raise ValueError(f"pairs[{i}] must be a (prompt, completion) tuple of two str, got {pair!r:.80}.")
        if not pairs:
            return []
        for name, given in (("captures", captures), ("since", since)):
            if given is not None and len(given) != len(pairs):
                raise ValueError(f"{name} must have one entry per pair ({len(pairs)}), got {len(given)}.")
        with self._lock:
            captures = list(captures) if captures is not None else [None] * len(pairs)
            items = self._tokenize([p for p, _ in pairs], [c for _, c in pairs], captures)
            resumes = [s if isinstance(s, Resume) else None for s in since or [None] * len(pairs)]
            for item, start in zip(items, since or []):
                chars = start.chars if isinstance(start, Resume) else start
                if chars is not None:
                    self._skip_scored(item, chars)
            live = [b for b, it in enumerate(items) if it.ids]  # no ids (both parts empty, no BOS): nothing to score
            caps = [(captures[b].key, captures[b].release) if captures[b] else None for b in live]
            preds = self._predict([items[b].ids for b in live], caps, [resumes[b] for b in live]) if live else []
            found = dict(zip(live, preds))
            empty = np.zeros((0, self.index.dim), np.float32)
            return [self._report(found.get(b, empty), it) for b, it in enumerate(items)]

    # -- steps

    def _tokenize(self, prompts: list[str], completions: list[str], captures: list) -> list[_Item]:
        kw = dict(add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        given = [c is not None and c.prompt_ids is not None and c.completion_ids is not None for c in captures]
        todo = [i for i, g in enumerate(given) if not g]
        enc_p = self.tokenizer([prompts[i] for i in todo], **kw) if todo else {}
        enc_c = self.tokenizer([completions[i] for i in todo], **kw) if todo else {}
        at = {i: j for j, i in enumerate(todo)}
        bos = self.tokenizer.bos_token_id
        items = []
        for i, (p_text, c_text) in enumerate(zip(prompts, completions)):
            if given[i]:
                p_ids, c_ids = [int(t) for t in captures[i].prompt_ids], [int(t) for t in captures[i].completion_ids]
                p_off = c_off = None
            else:
                j = at[i]
                p_ids, c_ids = enc_p["input_ids"][j], enc_c["input_ids"][j]
                p_off = np.asarray(enc_p["offset_mapping"][j]).reshape(-1, 2)
                c_off = np.asarray(enc_c["offset_mapping"][j]).reshape(-1, 2)
            own_bos = bos is not None and bool(p_ids) and p_ids[0] == bos
            prefix = [bos] if bos is not None else []
            p_start = 1 if own_bos else 0  # the prompt's own BOS becomes the prefix
            n_prefix = len(prefix)
            drop_p, drop_c = truncation(n_prefix, len(p_ids) - p_start, len(c_ids), self.max_tokens)
            p_keep, c_keep = p_ids[p_start + drop_p :], c_ids[drop_c:]
            prompt = _Part(p_text, p_off, p_start + drop_p, n_prefix, ids=p_ids)
            completion = _Part(c_text, c_off, drop_c, n_prefix + len(p_keep), ids=c_ids)
            prompt.rows, completion.rows = part_rows(n_prefix, len(p_keep), len(c_keep))
            items.append(_Item(prefix + p_keep + c_keep, prompt, completion, bool(drop_p or drop_c)))
        return items

    def _skip_scored(self, item: _Item, since: int) -> None:
        """Keep only the rows of windows that start at most ``RESCORE_CHARS`` before character ``since`` of the
        completion (and none of the prompt's): the rest were scored before, with the same tokens up to them."""
        part = item.completion
        stable = self._tokens_within(part, max(0, int(since) - RESCORE_CHARS))
        item.prompt.rows = item.prompt.rows[:0]
        item.prompt.names_from = len(item.prompt.text)
        part.names_from = max(0, int(since) - (self.names.max_chars if self.names is not None else 0))
        # row t scores the window starting at part token t + 1 - first_row + base; rows before token `stable` read
        # only tokens that were already there (and stay), so they were scored before with the same result
        part.rows = part.rows[part.rows + 1 - part.first_row + part.base >= stable]

    def _tokens_within(self, part: _Part, chars: int) -> int:
        """How many of the part's leading tokens end within its first ``chars`` characters."""
        if part.offsets is not None:
            ends = np.maximum.accumulate(part.offsets[:, 1]) if len(part.offsets) else part.offsets[:, 1]
            return int(np.searchsorted(ends, chars, side="right"))
        lo, hi = 0, len(part.ids)  # vLLM's tokens: the longest start that decodes within ``chars``
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self.tokenizer.decode(part.ids[:mid], skip_special_tokens=True)) <= chars:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _predict(self, sequences: list[list[int]], captures, resumes: list) -> list[np.ndarray]:
        """(T_i, D) float32 predictor outputs per sequence: those of a stream (``resumes[i]``) from its cached start
        on, the others in one padded batch."""
        # a stream's states from the backend's own cache of it, unless vLLM's capture holds them; the rest batched
        alone = [b for b, r in enumerate(resumes) if r is not None and captures[b] is None]
        states: list = [None] * len(sequences)
        for b in alone:
            states[b] = self.backend.stream_states(resumes[b].key, sequences[b], resumes[b].final)
        rest = [b for b in range(len(sequences)) if states[b] is None]
        if rest:
            got = self.backend.hidden_states([sequences[b] for b in rest], [captures[b] for b in rest])
            for b, h in zip(rest, got):
                states[b] = h
        out: list[np.ndarray | None] = [None] * len(sequences)
        streams = [b for b, r in enumerate(resumes) if r is not None]
        if streams and isinstance(self.predictor, EmbeddingPredictor):  # whose layers `extend_batch` continues
            rows = self._extend_streams([resumes[b] for b in streams], [sequences[b] for b in streams],
                                        [states[b] for b in streams])  # fmt: skip
            for b, r in zip(streams, rows):
                out[b] = r
        batch = [b for b in range(len(sequences)) if out[b] is None]
        if batch:
            width = max(len(sequences[b]) for b in batch)
            hidden = torch.zeros((len(batch), width, states[batch[0]].shape[1]), dtype=torch.float32)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, b in enumerate(batch):
                hidden[row, : len(states[b])] = torch.from_numpy(states[b])
                mask[row, : len(states[b])] = 1
            with torch.inference_mode():
                preds = self.predictor(hidden, mask).float().numpy()
            for row, b in enumerate(batch):
                out[b] = preds[row, : len(sequences[b])]
                self.rows_predicted += len(sequences[b])
        return out  # type: ignore[return-value]

    def _extend_streams(self, resumes: list[Resume], ids: list[list[int]], states: list[np.ndarray]):
        """The predictor's rows of streams' sequences, in one pass that computes only the rows past what each
        shares with the cached state of its last scoring; the new states are cached unless this was the last
        scoring."""
        cached = [self._streams.pop(r.key) or PrefixState() for r in resumes]
        shared = [c.common_prefix(seq) for c, seq in zip(cached, ids)]
        starts = [c.cut(n) for c, n in zip(cached, shared)]
        new = extend_batch(self.predictor, [torch.from_numpy(h) for h in states], starts, ids)
        self.rows_predicted += sum(len(seq) - n for seq, n in zip(ids, shared))
        for r, state in zip(resumes, new):
            if not r.final:
                self._streams.put(r.key, state, state.nbytes())
        return [state.rows.float().numpy() for state in new]

    def _ranked(self, best: np.ndarray) -> np.ndarray:
        """Concept rows to report, score descending (ties: lower row first); all of them or the top_k."""
        if self.top_k is None or len(best) <= _ARGSORT_MAX:
            order = np.argsort(-best, kind="stable")
            return order if self.top_k is None else order[: self.top_k]
        top = np.argpartition(-best, self.top_k - 1)[: self.top_k]  # O(C) instead of sorting every concept
        return top[np.lexsort((top, -best[top]))]

    def _part(self, part: _Part, preds: np.ndarray) -> tuple[list[ConceptScore], list[str], float]:
        """Scores of one part from ``preds`` (T, D): (top_k ConceptScores, flagged labels, best score or -1.0)."""
        best, where = self.index.concept_scores(preds[part.rows])  # (C,), (C,) index into part.rows or -1
        self.rows_scored += len(part.rows)
        thresholds, labels = self.index.thresholds, self.index.labels
        named = self.names.find(part.text, part.names_from) if self.names is not None else {}
        over = best > thresholds  # a new array: marking the named concepts in it changes nothing else
        if named:
            over[list(named)] = True
        hit = np.flatnonzero(over)
        flagged = [labels[c] for c in hit[np.lexsort((hit, -best[hit]))]]  # score descending
        keep = self._ranked(best)
        if named:  # a named concept is always reported, whatever its rank by score
            shown = set(keep.tolist())
            keep = np.concatenate([keep, np.array([c for c in sorted(named) if c not in shown], dtype=np.int64)])
        found = where[keep] >= 0
        rows = np.full(len(keep), -1, dtype=np.int64)
        rows[found] = part.rows[where[keep][found]]
        positions = np.where(found, rows + 1 - part.first_row + part.base, -1)  # window start, in the part
        starts = np.zeros(len(keep), dtype=np.int64)
        if part.offsets is not None:
            starts[found] = window_char_starts(positions[found], part.offsets)
        else:  # vLLM's tokens: the window starts after the text its first p tokens decode to
            decode = self.tokenizer.decode
            starts[found] = [len(decode(part.ids[:p], skip_special_tokens=True)) for p in positions[found]]
        scores = []
        for c, row, pos, start, ok in zip(keep, rows, positions, starts, found):
            score, thr = float(best[c]), float(thresholds[c])
            name_at = named.get(int(c))
            if name_at is not None and not score > thr:  # flagged by its name: the excerpt shows where it is written
                start, ok = name_at[0], True
            span = excerpt_span(part.text, start, self.excerpt_chars) if ok else (0, 0)
            excerpt = part.text[span[0] : span[1]]
            is_named = name_at is not None
            flag = score > thr or is_named
            scores.append(ConceptScore(labels[c], score, thr, flag, int(pos), span, excerpt, int(row), is_named))
        return scores, flagged, float(best.max()) if len(part.rows) else -1.0

    def _report(self, rows: np.ndarray, item: _Item) -> LeakageReport:
        """The report of ``item`` from its predictor outputs ``rows`` (T, D)."""
        prompt, prompt_flagged, _ = self._part(item.prompt, rows)
        completion, flagged, max_score = self._part(item.completion, rows)
        return LeakageReport(
            prompt=prompt,
            completion=completion,
            flagged=flagged,
            prompt_flagged=prompt_flagged,
            max_score=max_score,
            truncated=item.truncated,
            n_tokens=len(item.ids),
        )
