"""The concept index: a FAISS index over L2-normalised concept vectors, so inner product is cosine similarity.

Index kinds (``ConceptIndex.build(..., kind=...)``):

- ``"flat"``: ``IndexFlatIP``, exact. Scoring is a matrix product over every concept.
- ``"hnsw"``: ``IndexHNSWFlat`` with the inner-product metric, ``M = 16`` links per node and ``efSearch = 32``;
  approximate, for concept sets too large to score exhaustively. ``concept_scores`` takes the top
  ``HNSW_SCORE_K`` concepts of every query as candidates and scores every candidate exactly against every query.
- ``"auto"`` (default): flat up to ``AUTO_FLAT_MAX`` (10,000) concepts, hnsw above.

Saved as two files in one directory: ``concepts.faiss`` (``faiss.write_index``) and ``concepts.json`` (sorted keys:
``dim``, ``format_version``, ``kind``, ``labels``, ``thresholds``). Loading checks that the two agree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from atu.errors import FormatError

FORMAT_VERSION = 1
INDEX_NAME = "concepts.faiss"
META_NAME = "concepts.json"
KINDS = ("auto", "flat", "hnsw")
# Exact scoring grows linearly with the number of concepts; up to about this many it meets the guard's 10 ms target
# for 128 query vectors on a small CPU (benchmarks/index_scale.py; figures in docs/serving.md).
AUTO_FLAT_MAX = 10_000  # above this many concepts, "auto" picks hnsw
HNSW_M = 16
HNSW_EF_SEARCH = 32
HNSW_SCORE_K = 64  # concept_scores on hnsw: candidates = the top min(C, 64) concepts of each query
_FLAT_CHUNK = 1024  # queries per matrix product in concept_scores, to bound memory at (chunk, C)


def _as_matrix(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 (N, D) array (a copy when needed), checking its shape."""
    arr = np.asarray(x)
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"{name} must have shape {want}, got {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}.")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _normalise_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """(N, D) -> (N, D) float32 unit rows; a new array, the caller's is never modified. Zero rows stay zero."""
    q = _as_matrix(queries, "queries", dim)
    if not np.isfinite(q).all():
        bad = int(np.flatnonzero(~np.isfinite(q).all(axis=1))[0])
        raise ValueError(f"queries row {bad} contains NaN or inf.")
    norms = np.linalg.norm(q, axis=1, keepdims=True)  # (N, 1)
    return q / np.maximum(norms, 1e-12)


def _read_meta(meta_path: Path) -> tuple[list[str], np.ndarray, int, str]:
    """(labels, thresholds (C,) float32, dim, kind) of a concept index's metadata file, checked."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{meta_path}: cannot read the concept index metadata ({err}).") from err
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else type(meta).__name__
        raise FormatError(f"{meta_path}: format_version must be {FORMAT_VERSION}, got {got!r}.")
    expected = {"dim", "format_version", "kind", "labels", "thresholds"}
    if set(meta) != expected:
        raise FormatError(f"{meta_path}: keys must be {sorted(expected)}, got {sorted(meta)}.")
    labels, thresholds, dim, kind = meta["labels"], meta["thresholds"], meta["dim"], meta["kind"]
    if kind not in ("flat", "hnsw"):
        raise FormatError(f"{meta_path}: kind must be 'flat' or 'hnsw', got {kind!r}.")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
        raise FormatError(f"{meta_path}: labels must be a list of unique strings.")
    if not isinstance(thresholds, list) or len(thresholds) != len(labels):
        got = len(thresholds) if isinstance(thresholds, list) else type(thresholds).__name__
        raise FormatError(f"{meta_path}: {len(labels)} labels but {got} thresholds.")
    try:
        thr = np.asarray(thresholds, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise FormatError(f"{meta_path}: thresholds must be numbers ({err}).") from err
    if not np.isfinite(thr).all():
        raise FormatError(f"{meta_path}: thresholds must be finite numbers.")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise FormatError(f"{meta_path}: dim must be a positive int, got {dim!r}.")
    return labels, thr, dim, kind


@dataclass
class ConceptIndex:
    """A FAISS index over unit concept vectors, with one label and one threshold (tau) per concept.

    Build with ``ConceptIndex.build`` or ``ConceptIndex.load``; row ``i`` of the index is ``labels[i]``.
    """

    index: faiss.Index
    labels: list[str]
    thresholds: np.ndarray  # (C,) float32, the cosine above which a concept counts as leaked
    kind: str  # "flat" or "hnsw" (never "auto": that is resolved at build time)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def build(
        cls, vectors: np.ndarray, labels: list[str], thresholds: np.ndarray | list[float], kind: str = "auto"
    ) -> ConceptIndex:
        """Index concept vectors (C, D); they are L2-normalised (on a copy) before indexing.

        Raises:
            ValueError: when shapes or lengths disagree, a label is repeated or empty, a vector is not finite or is
                zero (the message names the row), a threshold is not a finite number, or ``kind`` is unknown.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
        vecs = _as_matrix(vectors, "vectors")  # (C, D)
        n, dim = vecs.shape
        if n == 0 or dim == 0:
            raise ValueError(f"vectors must hold at least one concept of dimension >= 1, got shape {vecs.shape}.")
        labels = list(labels)
        try:
            thr = np.array(thresholds, dtype=np.float32)  # a copy: the index owns its thresholds
        except (TypeError, ValueError) as err:
            raise ValueError(f"thresholds must be numbers, one per concept ({err}).") from err
        if thr.ndim != 1 or len(labels) != n or len(thr) != n:
            raise ValueError(
                f"vectors, labels and thresholds must describe the same concepts: got {n} vectors, "
                f"{len(labels)} labels and thresholds of shape {thr.shape}."
            )
        for i, label in enumerate(labels):
            if not isinstance(label, str) or not label.strip():
                raise ValueError(f"labels[{i}] must be a non-empty string, got {label!r}.")
        seen: dict[str, int] = {}
        for i, label in enumerate(labels):
            if label in seen:
                raise ValueError(f"duplicate label {label!r} at rows {seen[label]} and {i}; labels must be unique.")
            seen[label] = i
        if not np.isfinite(thr).all():
            bad = int(np.flatnonzero(~np.isfinite(thr))[0])
            raise ValueError(f"thresholds[{bad}] ({labels[bad]!r}) is {thr[bad]}; thresholds must be finite.")
        finite = np.isfinite(vecs).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise ValueError(f"vectors row {bad} ({labels[bad]!r}) contains NaN or inf.")
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)  # (C, 1)
        if (norms == 0).any():
            bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
            raise ValueError(f"vectors row {bad} ({labels[bad]!r}) is the zero vector; it has no direction.")
        unit = vecs / norms

        if kind == "auto":
            kind = "flat" if n <= AUTO_FLAT_MAX else "hnsw"
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = HNSW_EF_SEARCH
        index.add(unit)
        return cls(index=index, labels=labels, thresholds=thr, kind=kind)

    def vectors(self) -> np.ndarray:
        """(C, D) float32: the stored unit-length concept vectors, in label order."""
        return self.index.reconstruct_n(0, self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar concepts to each query.

        Args:
            queries: (N, D), any scale; L2-normalised on a copy (zero rows score 0 against everything).
            k: 1 <= k <= number of concepts.

        Returns:
            scores (N, k) float32 cosines, best first, and ids (N, k) int64 rows of ``labels``. An hnsw index may
            find fewer than ``k`` neighbours; the missing slots have id -1.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(self):
            raise ValueError(f"k must be an int in [1, {len(self)}] (the number of concepts), got {k!r}.")
        q = _normalise_queries(queries, self.dim)  # (N, D)
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        scores, ids = self.index.search(q, int(k))
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def concept_scores(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For every concept, its best cosine over the N queries and the query position reaching it.

        Args:
            queries: (N, D), e.g. one predicted embedding per token of a completion.

        Returns:
            scores (C,) float32 and positions (C,) int64. Flat: exact, ties go to the earliest position. Hnsw: the
            candidates are the top k = min(C, 64) concepts of each query; every candidate gets its exact best score
            over all queries and its position; a concept no query returned gets score -1.0 (the lowest cosine) and
            position -1. With N = 0 every concept gets -1.0 and -1.
        """
        q = _normalise_queries(queries, self.dim)  # (N, D)
        n_concepts = len(self)
        best = np.full(n_concepts, -1.0, dtype=np.float32)
        where = np.full(n_concepts, -1, dtype=np.int64)
        if len(q) == 0:
            return best, where
        # A zero-copy view of the stored unit vectors (C, D); reconstruct_n would copy them on every call.
        storage = self.index if self.kind == "flat" else faiss.downcast_index(self.index.storage)
        concepts = faiss.rev_swig_ptr(storage.get_xb(), n_concepts * self.dim).reshape(n_concepts, self.dim)
        if self.kind == "flat":
            for start in range(0, len(q), _FLAT_CHUNK):
                # (C, n): argmax along contiguous rows is several times faster than along axis 0 of (n, C).
                sims = concepts @ q[start : start + _FLAT_CHUNK].T
                top = sims.argmax(axis=1)  # (C,) first maximum within the chunk
                vals = sims[np.arange(n_concepts), top]
                better = vals > best if start else np.ones(n_concepts, dtype=bool)
                best[better] = vals[better]
                where[better] = top[better] + start
            return best, where

        _, ids = self.search(q, min(n_concepts, HNSW_SCORE_K))  # (N, k) candidates
        cand = np.unique(ids[ids >= 0])  # (U,)
        if len(cand):
            # Exact best over all queries for every candidate, on FAISS's own BLAS and thread pool: interleaving it
            # with numpy's BLAS makes the two pools spin against each other on a small CPU.
            scores, pos = faiss.knn(np.ascontiguousarray(concepts[cand]), q, 1, metric=faiss.METRIC_INNER_PRODUCT)
            best[cand], where[cand] = scores[:, 0], pos[:, 0]
        return best, where

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``concepts.faiss`` and ``concepts.json`` into ``directory`` (created if missing).

        Raises:
            OSError: when a file cannot be written (faiss reports write errors as RuntimeError; they are re-raised
                as OSError so that callers handle a full disk in one place).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "dim": self.dim,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "labels": list(self.labels),
            "thresholds": [float(t) for t in self.thresholds],
        }
        tmp_index, tmp_meta = directory / f".{INDEX_NAME}.tmp", directory / f".{META_NAME}.tmp"
        try:
            faiss.write_index(self.index, str(tmp_index))
        except RuntimeError as err:
            tmp_index.unlink(missing_ok=True)
            raise OSError(f"{directory / INDEX_NAME}: faiss could not write the index: {err}") from err
        tmp_meta.write_text(json.dumps(meta, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp_index, directory / INDEX_NAME)
        os.replace(tmp_meta, directory / META_NAME)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ConceptIndex:
        """Read an index written by ``save``.

        Raises:
            FormatError (a ValueError) naming the file when a file is missing or corrupt, or when the JSON and the
            FAISS index disagree (concept count, dimension, index type or metric).
        """
        directory = Path(directory)
        meta_path, index_path = directory / META_NAME, directory / INDEX_NAME
        labels, thr, dim, kind = _read_meta(meta_path)
        if not index_path.is_file():
            raise FormatError(f"{index_path}: file not found (it belongs with {meta_path.name}).")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FormatError(f"{index_path}: cannot read the FAISS index ({first}).") from err
        want_type = faiss.IndexFlatIP if kind == "flat" else faiss.IndexHNSWFlat
        if not isinstance(index, want_type) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise FormatError(
                f"{index_path}: expected an inner-product {want_type.__name__} ({meta_path.name} says kind "
                f"{kind!r}), found {type(index).__name__} with metric {index.metric_type}."
            )
        if index.ntotal != len(labels):
            raise FormatError(
                f"{index_path}: holds {index.ntotal} vectors but {meta_path.name} lists {len(labels)} concepts."
            )
        if index.d != dim:
            raise FormatError(f"{index_path}: dimension {index.d}, but {meta_path.name} says dim {dim}.")
        if kind == "hnsw":
            index.hnsw.efSearch = HNSW_EF_SEARCH
        return cls(index=index, labels=list(labels), thresholds=thr, kind=kind)
