from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from atu.errors import FormatError
from atu.index import AUTO_FLAT_MAX, ConceptIndex


@pytest.fixture(autouse=True)
def _one_thread():
    # The CPU is shared with other test processes; FAISS's OpenMP pool would otherwise take every core.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _concepts(n: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32) * rng.uniform(0.5, 3.0, size=(n, 1)).astype(np.float32)
    labels = [f"concept-{i}" for i in range(n)]
    thresholds = rng.uniform(0.2, 0.9, size=n).astype(np.float32)
    return vectors, labels, thresholds


def test_flat_search_matches_brute_force():
    vectors, labels, thresholds = _concepts(50, 16)
    index = ConceptIndex.build(vectors, labels, thresholds)
    assert index.kind == "flat" and len(index) == 50 and index.dim == 16
    queries = np.random.default_rng(1).normal(size=(7, 16)).astype(np.float64) * 5  # any scale, any float dtype
    queries_before = queries.copy()

    scores, ids = index.search(queries, k=5)

    assert scores.shape == ids.shape == (7, 5) and scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(queries, queries_before)  # normalised on a copy
    sims = _unit(queries) @ _unit(vectors.astype(np.float64)).T  # (7, 50)
    np.testing.assert_array_equal(ids, np.argsort(-sims, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, ids, axis=1), atol=1e-5)


def test_flat_concept_scores_match_brute_force():
    vectors, labels, thresholds = _concepts(40, 12, seed=2)
    index = ConceptIndex.build(vectors, labels, thresholds, kind="flat")
    queries = np.random.default_rng(3).normal(size=(9, 12)).astype(np.float32)

    best, where = index.concept_scores(queries)

    sims = _unit(queries.astype(np.float64)) @ _unit(vectors.astype(np.float64)).T  # (9, 40)
    assert best.shape == where.shape == (40,) and best.dtype == np.float32 and where.dtype == np.int64
    np.testing.assert_allclose(best, sims.max(axis=0), atol=1e-5)
    np.testing.assert_array_equal(where, sims.argmax(axis=0))


def test_flat_concept_scores_across_chunks(monkeypatch):
    import atu.index

    monkeypatch.setattr(atu.index, "_FLAT_CHUNK", 4)  # force several chunks for 11 queries
    vectors, labels, thresholds = _concepts(20, 8, seed=4)
    index = ConceptIndex.build(vectors, labels, thresholds)
    queries = np.random.default_rng(5).normal(size=(11, 8)).astype(np.float32)
    best, where = index.concept_scores(queries)
    sims = _unit(queries.astype(np.float64)) @ _unit(vectors.astype(np.float64)).T
    np.testing.assert_allclose(best, sims.max(axis=0), atol=1e-5)
    np.testing.assert_array_equal(where, sims.argmax(axis=0))


def test_concept_scores_ties_go_to_the_earliest_position():
    index = ConceptIndex.build(np.eye(3, dtype=np.float32), ["a", "b", "c"], [0.5, 0.5, 0.5])
    queries = np.array([[0, 1, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=np.float32)
    best, where = index.concept_scores(queries)
    np.testing.assert_allclose(best, [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(where, [1, 0, 0])


def test_empty_queries():
    index = ConceptIndex.build(np.eye(3, dtype=np.float32), ["a", "b", "c"], [0.5] * 3)
    best, where = index.concept_scores(np.zeros((0, 3), np.float32))
    np.testing.assert_array_equal(best, [-1.0, -1.0, -1.0])
    np.testing.assert_array_equal(where, [-1, -1, -1])
    scores, ids = index.search(np.zeros((0, 3), np.float32), k=2)
    assert scores.shape == ids.shape == (0, 2)


def test_hnsw_recall_against_brute_force():
    n, dim = 5000, 32
    vectors, labels, thresholds = _concepts(n, dim, seed=6)
    index = ConceptIndex.build(vectors, labels, thresholds, kind="hnsw")
    assert index.kind == "hnsw" and isinstance(index.index, faiss.IndexHNSWFlat)
    assert index.index.hnsw.efSearch == 32
    rng = np.random.default_rng(7)
    source = rng.choice(n, size=200, replace=False)
    unit = _unit(vectors.astype(np.float64))
    queries = (unit[source] + rng.normal(scale=0.3 / np.sqrt(dim), size=(200, dim))).astype(np.float32)

    scores, ids = index.search(queries, k=1)

    truth = (_unit(queries.astype(np.float64)) @ unit.T).argmax(axis=1)  # (200,)
    assert (ids[:, 0] == truth).mean() >= 0.95


def test_hnsw_concept_scores_agree_with_brute_force_where_returned():
    n, dim = 300, 16
    vectors, labels, thresholds = _concepts(n, dim, seed=8)
    index = ConceptIndex.build(vectors, labels, thresholds, kind="hnsw")
    queries = np.random.default_rng(9).normal(size=(5, dim)).astype(np.float32)

    best, where = index.concept_scores(queries)

    sims = _unit(queries.astype(np.float64)) @ _unit(vectors.astype(np.float64)).T  # (5, 300)
    returned = where >= 0
    # At most 64 concepts per query come back; the rest are reported as -1.0 at position -1.
    assert returned.sum() <= 5 * 64 and (~returned).any()
    np.testing.assert_array_equal(best[~returned], -1.0)
    np.testing.assert_allclose(best[returned], sims[where[returned], np.flatnonzero(returned)], atol=1e-5)
    # Every returned concept is rescored against every query: its score is its exact best, at its best position.
    np.testing.assert_allclose(best[returned], sims.max(axis=0)[returned], atol=1e-5)
    np.testing.assert_array_equal(where[returned], sims.argmax(axis=0)[returned])
    # The overall best concept is found, at the right position.
    top = int(sims.max(axis=0).argmax())
    assert returned[top] and where[top] == sims[:, top].argmax()
    np.testing.assert_allclose(best[top], sims[:, top].max(), atol=1e-5)


def test_hnsw_small_set_scores_every_concept():
    vectors, labels, thresholds = _concepts(30, 8, seed=10)
    index = ConceptIndex.build(vectors, labels, thresholds, kind="hnsw")
    queries = np.random.default_rng(11).normal(size=(4, 8)).astype(np.float32)
    best, where = index.concept_scores(queries)  # k = min(C, 64) = C: exact
    sims = _unit(queries.astype(np.float64)) @ _unit(vectors.astype(np.float64)).T
    np.testing.assert_allclose(best, sims.max(axis=0), atol=1e-5)
    np.testing.assert_array_equal(where, sims.argmax(axis=0))


def test_auto_kind_threshold(monkeypatch):
    import atu.index

    assert AUTO_FLAT_MAX == 10_000
    monkeypatch.setattr(atu.index, "AUTO_FLAT_MAX", 10)
    vectors, labels, thresholds = _concepts(11, 4)
    assert ConceptIndex.build(vectors, labels, thresholds).kind == "hnsw"
    assert ConceptIndex.build(vectors[:10], labels[:10], thresholds[:10]).kind == "flat"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda v, lab, t: (v, lab[:-1], t), r"3 vectors, 2 labels"),
        (lambda v, lab, t: (v, lab, t[:2]), r"thresholds of shape \(2,\)"),
        (lambda v, lab, t: (v, ["a", "b", "a"], t), r"duplicate label 'a' at rows 0 and 2"),
        (lambda v, lab, t: (v, ["a", "", "c"], t), r"labels\[1\] must be a non-empty string"),
        (lambda v, lab, t: (np.where(np.arange(3)[:, None] == 1, np.nan, v), lab, t), r"vectors row 1 \('b'\)"),
        (lambda v, lab, t: (np.where(np.arange(3)[:, None] == 2, 0.0, v), lab, t), r"row 2 \('c'\) is the zero"),
        (lambda v, lab, t: (v, lab, np.array([0.5, np.inf, 0.5])), r"thresholds\[1\] \('b'\) is inf"),
        (lambda v, lab, t: (v, lab, [0.5, None, 0.5]), r"thresholds\[1\] \('b'\) is nan"),  # unset tau
        (lambda v, lab, t: (v, lab, [0.5, "high", 0.5]), r"thresholds must be numbers"),
        (lambda v, lab, t: (v[0], lab, t), r"vectors must have shape \(N, D\)"),
    ],
)
def test_build_validation(change, match):
    vectors = np.ones((3, 4), np.float32) + np.eye(3, 4, dtype=np.float32)
    args = change(vectors, ["a", "b", "c"], np.array([0.5, 0.6, 0.7], np.float32))
    with pytest.raises(ValueError, match=match):
        ConceptIndex.build(*args)


def test_build_rejects_unknown_kind():
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'ivf'"):
        ConceptIndex.build(np.eye(2), ["a", "b"], [0.5, 0.5], kind="ivf")


def test_query_validation():
    index = ConceptIndex.build(np.eye(3, dtype=np.float32), ["a", "b", "c"], [0.5] * 3)
    with pytest.raises(ValueError, match=r"queries must have shape \(N, 3\), got \(2, 4\)"):
        index.search(np.ones((2, 4)), k=1)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\].*got 4"):
        index.search(np.ones((2, 3)), k=4)
    with pytest.raises(ValueError, match=r"queries row 1 contains NaN"):
        index.concept_scores(np.array([[1, 0, 0], [np.nan, 0, 0]], np.float32))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    vectors, labels, thresholds = _concepts(100, 8, seed=12)
    labels[3] = "Zoë Ångström"  # non-ASCII labels survive
    index = ConceptIndex.build(vectors, labels, thresholds, kind=kind)
    index.save(tmp_path)

    meta_text = (tmp_path / "concepts.json").read_text(encoding="utf-8")
    meta = json.loads(meta_text)
    assert list(meta) == sorted(meta) == ["dim", "format_version", "kind", "labels", "thresholds"]
    assert meta["dim"] == 8 and meta["kind"] == kind and meta["format_version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concepts.faiss", "concepts.json"]

    loaded = ConceptIndex.load(tmp_path)
    assert loaded.labels == labels and loaded.kind == kind and loaded.dim == 8
    np.testing.assert_array_equal(loaded.thresholds, thresholds)
    queries = np.random.default_rng(13).normal(size=(6, 8)).astype(np.float32)
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(index.concept_scores(queries), loaded.concept_scores(queries)):
        np.testing.assert_array_equal(a, b)


def _saved(tmp_path, n=5, dim=4):
    vectors, labels, thresholds = _concepts(n, dim)
    ConceptIndex.build(vectors, labels, thresholds).save(tmp_path)
    return tmp_path


def test_load_refuses_count_mismatch(tmp_path):
    _saved(tmp_path)
    meta = json.loads((tmp_path / "concepts.json").read_text())
    meta["labels"].append("extra")
    meta["thresholds"].append(0.5)
    (tmp_path / "concepts.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"concepts\.faiss: holds 5 vectors but concepts\.json lists 6 concepts"):
        ConceptIndex.load(tmp_path)


def test_load_refuses_dim_mismatch(tmp_path):
    _saved(tmp_path)
    meta = json.loads((tmp_path / "concepts.json").read_text())
    meta["dim"] = 5
    (tmp_path / "concepts.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"concepts\.faiss: dimension 4, but concepts\.json says dim 5"):
        ConceptIndex.load(tmp_path)


def test_load_refuses_other_index_type(tmp_path):
    _saved(tmp_path)
    other = faiss.IndexFlatL2(4)
    other.add(np.ones((5, 4), np.float32))
    faiss.write_index(other, str(tmp_path / "concepts.faiss"))
    with pytest.raises(FormatError, match=r"concepts\.faiss: expected an inner-product IndexFlatIP"):
        ConceptIndex.load(tmp_path)


def test_load_refuses_corrupt_files(tmp_path):
    _saved(tmp_path)
    (tmp_path / "concepts.faiss").write_bytes(b"not an index")
    with pytest.raises(FormatError, match=r"concepts\.faiss: cannot read the FAISS index"):
        ConceptIndex.load(tmp_path)
    (tmp_path / "concepts.json").write_text("{")
    with pytest.raises(FormatError, match=r"concepts\.json: cannot read"):
        ConceptIndex.load(tmp_path)
    (tmp_path / "concepts.json").unlink()
    with pytest.raises(FormatError, match=r"concepts\.json: cannot read"):
        ConceptIndex.load(tmp_path)


def test_load_refuses_threshold_count_mismatch(tmp_path):
    _saved(tmp_path)
    meta = json.loads((tmp_path / "concepts.json").read_text())
    meta["thresholds"].pop()
    (tmp_path / "concepts.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"concepts\.json: 5 labels but 4 thresholds"):
        ConceptIndex.load(tmp_path)


def test_save_reports_faiss_write_errors_as_oserror(tmp_path, monkeypatch):
    index = ConceptIndex.build(np.eye(2, dtype=np.float32), ["a", "b"], [0.5, 0.5])

    def failing_write(idx, path):
        raise RuntimeError("Error in faiss::write_index: write error (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", failing_write)
    with pytest.raises(OSError, match=r"concepts\.faiss: faiss could not write the index"):
        index.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_vectors_returns_the_normalised_concepts():
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(5, 16)).astype(np.float32)
    idx = ConceptIndex.build(vecs, [f"c{i}" for i in range(5)], np.full(5, 0.5, np.float32))
    np.testing.assert_allclose(idx.vectors(), vecs / np.linalg.norm(vecs, axis=1, keepdims=True), atol=1e-6)
