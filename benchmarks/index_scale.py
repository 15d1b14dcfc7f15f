"""Concept-index scale: build time, memory, search latency and recall from 10 to 100,000 concepts.

What the guard does per scored text: one predicted embedding per token (a batch of 128 here), then
``ConceptIndex.concept_scores`` (every concept's best cosine over the batch, and where). This benchmark builds
indexes of random unit concept vectors (dim 384, like MiniLM; seeded) of every kind ``atu.index`` offers (flat,
hnsw, auto) and measures, per size and kind:

- build time, index size (``faiss.serialize_index``) and the process RSS delta of the build;
- latency (p50/p99 over repeats after warmup) of ``search(q, 10)`` and ``concept_scores(q)`` for 128 queries;
- recall of the approximate index against exact: recall@10 of ``search``, and for ``concept_scores`` the guard's
  recall: among concepts whose exact best score exceeds a threshold t, the share whose score is found exactly
  (within 1e-5) and the share that is still flagged (score above t). The guard flags a concept when its best cosine
  is above its threshold, so "every concept above threshold is found" is the recall that matters.

Queries are realistic for the guard: a quarter of each batch lies near a few concepts (concept vector plus noise,
cosine 0.2 to 0.9, four consecutive "tokens" per concept, like a phrase that names it), the rest are random
(t = 0.2 / 0.3 / 0.4). ``--vectors names`` swaps in real MiniLM vectors: embeddings of person names as concepts and
of the world corpus's 8-token future windows as queries (t = 0.6 / 0.7 / 0.8: names sit close together in MiniLM).

A sweep at the largest size then measures what else could meet the target (128 vectors against 100,000
concepts in at most 2 ms p50, at least 0.99 of the concepts above the threshold found exactly): hnsw with other
``M`` / ``efSearch``, the current top-64 scoring against a proposed "candidates + exact rescore" scoring (top-k
ids per query from the approximate index, then the exact cosine of every candidate against every query), IVF, and
an exact flat path with a faster memory layout.

    python benchmarks/index_scale.py                  # 10 .. 100,000 concepts + sweep at 100,000 (about 5 min)
    python benchmarks/index_scale.py --quick          # 10 .. 10,000 + sweep at 10,000 (about 1 min)
    python benchmarks/index_scale.py --vectors names   # MiniLM names and windows (first run embeds them: ~3 min)
    python benchmarks/index_scale.py --vectors facts   # MiniLM bio sentences (the guard's default is a centroid)
    python benchmarks/index_scale.py --threads 1 --no-sweep

Run it under the heavy-work lock: ``flock /tmp/atu-heavy.lock .venv/bin/python benchmarks/index_scale.py``.
Writes results/index_scale.json and results/index_scale.md (``--vectors names``/``facts``: index_scale_names.*,
index_scale_facts.*; ``--quick``
adds ``_quick``). Every figure is measured on this run only (the name embeddings are inputs, cached).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from atu import __version__
from atu import index as atu_index
from atu.index import ConceptIndex

DIM = 384
BATCH = 128
K = 10
# Thresholds whose recall is reported, per vector set, and the one that decides the recommendation. MiniLM
# embeddings of names sit much closer together than random vectors (median best cosine of a name over 128 corpus
# windows: 0.37, 99th percentile 0.60), so a useful guard threshold there is higher.
# Fact sentences (what the guard's default concept vectors, centroids of a person's texts, look like) sit closer to
# corpus windows than names do.
THRESHOLDS = {"random": (0.2, 0.3, 0.4), "names": (0.6, 0.7, 0.8), "facts": (0.6, 0.7, 0.8)}
GUARD_THRESHOLD = {"random": 0.3, "names": 0.7, "facts": 0.7}
TARGET_MS = 2.0
TARGET_RECALL = 0.99  # guard recall at the target's threshold
TARGET_CONCEPTS = 100_000
SIZES = (10, 100, 1_000, 10_000, 100_000)
QUICK_SIZES = (10, 100, 1_000, 10_000)
RECALL_BATCHES = 16  # query batches for recall (each 128 queries, about 8 concepts above 0.3 per batch)
RESCORE_KS = (16, 64)  # candidates per query for the rescoring variants (ivf: the first)


# ---------------------------------------------------------------------------------------------- data


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """(n, dim) float32 random unit vectors."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def guard_queries(
    concepts: np.ndarray, rng: np.random.Generator, n: int = BATCH, near_fraction: float = 0.25, run: int = 4
) -> np.ndarray:
    """(n, D) unit queries: ``near_fraction`` of them near random concepts (runs of ``run`` consecutive queries per
    concept, each at a cosine drawn from U(0.2, 0.9) to it), the rest random. Near queries are placed at random rows.
    """
    n_concepts, dim = concepts.shape
    q = unit_rows(rng, n, dim)
    n_near = int(n * near_fraction) // run * run
    starts = rng.choice(n // run, size=n_near // run, replace=False) * run
    for start in starts:
        c = concepts[rng.integers(n_concepts)]  # (D,)
        for i in range(start, start + run):
            cos = rng.uniform(0.2, 0.9)
            noise = q[i] - (q[i] @ c) * c  # random direction orthogonal to c
            noise /= np.linalg.norm(noise)
            q[i] = cos * c + np.sqrt(1 - cos**2) * noise
    return q


# Syllables for synthetic person names (a wider set than the world generator's, so 100,000 names are unique).
_ONSETS = (
    "Al Bren Cor Dav El Fen Gar Hal Is Jor Kel Lor Mar Nel Or Per Quin Ros Sel Tam Ul Vin Wen Yar Zel Ced Mir Tal"
)
_ONSETS += " Ab Ber Cas Dor Eb Fal Gil Han Ir Jas Kor Lin Mel Nor Os Pal Rin Sor Tor Val"
_ENDINGS = "a ic en ia o us ette ard is wyn ina an el ie on"
_PREFIXES = "Ash Brack Cal Dun Ever Fair Gold Hart Iron Kest Lang Moor North Oak Pell Rook Stan Thorn Wick Yew Marl"
_PREFIXES += " Sorrow Glen Vex Black Bright Cold Deep Elder Fern Grey High Holt Kings Lark Mill Red Silver Stone West"
_SUFFIXES = "wood field ridge by ton mere croft well stead ley hollow gard brook ham worth shaw"


def synthetic_names(n: int, seed: int, first: Sequence[str] = ()) -> list[str]:
    """``first`` followed by distinct synthetic "First Last" names, ``n`` in all (seeded)."""
    firsts = [o + e for o in _ONSETS.split() for e in _ENDINGS.split()]
    lasts = [p + s for p in _PREFIXES.split() for s in _SUFFIXES.split()]
    if n - len(first) > len(firsts) * len(lasts):
        raise ValueError(f"at most {len(firsts) * len(lasts)} synthetic names, asked for {n}")
    taken = set(first)
    rng = np.random.default_rng(seed)
    out = list(first)[:n]
    for code in rng.permutation(len(firsts) * len(lasts)):
        if len(out) >= n:
            break
        name = f"{firsts[code // len(lasts)]} {lasts[code % len(lasts)]}"
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


_PROFESSIONS = "painter botanist engineer poet architect cartographer violinist chemist sculptor archivist".split()


def fact_sentences(names: Sequence[str], seed: int) -> list[str]:
    """One invented bio sentence per name (birthplace, year, employer, profession), seeded."""
    rng = np.random.default_rng([seed, 7])
    places = [p + s for p in _PREFIXES.split() for s in _SUFFIXES.split()]
    out = []
    for name in names:
        city, firm = places[rng.integers(len(places))], places[rng.integers(len(places))]
        job = _PROFESSIONS[rng.integers(len(_PROFESSIONS))]
        out.append(f"{name} was born in {city} in {rng.integers(1900, 2000)} and works at {firm} Press as a {job}.")
    return out


def names_dataset(n: int, n_batches: int, seed: int, facts: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """Realistic vectors: (n, 384) MiniLM embeddings of person names (the embedded world's 40 people first, then
    synthetic ones), or with ``facts`` of one invented bio sentence per name, and ``n_batches`` query batches of
    128 MiniLM embeddings of the real 8-token future windows of the world corpus (consecutive positions of
    consecutive texts: what the predictor is aligned to predict). Built once and cached under
    $ATU_CACHE/bench_index_names."""
    from atu import cache
    from atu.loading import load_encoder
    from atu.windows import build_windows
    from atu.world.build import build_world
    from atu.world.config import WorldConfig

    world = build_world(WorldConfig(), progress=False)
    key = {"format": 1, "n": n, "batches": n_batches, "seed": seed, "world": world.root.name, "dim": DIM}
    if facts:
        key["texts"] = "facts"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        encoder = load_encoder()
        names = synthetic_names(n, seed, first=world.concepts().names())
        if facts:
            names = fact_sentences(names, seed)
        t0 = time.time()
        vecs = encoder.encode(names, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
        print(f"  embedded {n:,} {'fact sentences' if facts else 'names'} in {time.time() - t0:.0f} s", flush=True)
        tok = AutoTokenizer.from_pretrained(str(world.model_dir))
        texts = [r.text for r in world.corpus()]
        windows: list[str] = []
        for i in range(0, len(texts), 32):
            wb = build_windows(texts[i : i + 32], tok, encoder.tokenizer, 8, 256)
            for b in range(len(wb.window_index)):
                windows += [wb.window_texts[j] for j in wb.window_index[b].tolist() if j >= 0]
            if len(windows) >= n_batches * BATCH:
                break
        queries = encoder.encode(windows[: n_batches * BATCH], batch_size=256, normalize_embeddings=True)
        np.save(tmp / "concepts.npy", vecs.astype(np.float32))
        np.save(tmp / "queries.npy", queries.astype(np.float32).reshape(n_batches, BATCH, DIM))
        (tmp / "names.json").write_text(json.dumps(names[:100]) + "\n")

    entry = cache.get_or_build("bench_index_names", key, build)
    queries = np.load(entry / "queries.npy")
    return np.load(entry / "concepts.npy"), [np.ascontiguousarray(q) for q in queries]


# ---------------------------------------------------------------------------------------------- measuring


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def latency_ms(fn: Callable[[np.ndarray], object], batches: list[np.ndarray], repeats: int, warmup: int) -> dict:
    """p50 / p99 / mean wall time (ms) of ``fn(batch)``, cycling through ``batches``."""
    for i in range(warmup):
        fn(batches[i % len(batches)])
    times = []
    for i in range(repeats):
        q = batches[i % len(batches)]
        t0 = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.asarray(times)
    return {
        "p50": round(float(np.percentile(t, 50)), 3),
        "p99": round(float(np.percentile(t, 99)), 3),
        "mean": round(float(t.mean()), 3),
    }


def exact_concept_scores(concepts: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(C,) best cosine of every concept over the queries, by brute force (the reference)."""
    return (concepts @ queries.T).max(axis=1)


def threshold_recall(exact: np.ndarray, approx: np.ndarray, thresholds: Sequence[float]) -> dict:
    """Per threshold t: among concepts with exact best > t, the share found exactly (|approx - exact| <= 1e-5) and
    the share still flagged (approx > t). ``exact`` and ``approx`` are (B, C): B query batches."""
    out = {}
    for t in thresholds:
        above = exact > t
        n = int(above.sum())
        out[str(t)] = {
            "n_above": n,
            "exact_match": float((np.abs(approx - exact) <= 1e-5)[above].mean()) if n else None,
            "flagged": float((approx > t)[above].mean()) if n else None,
        }
    return out


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray) -> float:
    """Mean share of each query's exact top-k ids that the approximate top-k holds."""
    hits = [len(set(e) & set(a)) for e, a in zip(exact_ids.tolist(), approx_ids.tolist())]
    return float(np.sum(hits) / exact_ids.size)


def index_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).size)


# ---------------------------------------------------------------------------------------------- alternatives


def flat_scores_transposed(concepts: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact concept_scores with the product laid out (C, N): argmax runs along contiguous rows, which numpy does
    several times faster than ``(N, C).argmax(axis=0)`` (the layout ``ConceptIndex`` uses)."""
    sims = concepts @ queries.T  # (C, N)
    where = sims.argmax(axis=1)  # (C,)
    return sims[np.arange(len(concepts)), where], where


def faiss_best_query(concepts: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact best cosine of every concept over the queries and the query reaching it, computed by FAISS (a k = 1
    search with the concepts as queries and the queries as the database). It runs on FAISS's own BLAS and OpenMP
    pool: alternating FAISS calls with numpy's BLAS on 2 cores makes the two thread pools spin against each other
    (measured at 10,000 concepts: HNSW search + a 1,800 x 128 numpy product took 13 ms, the two alone 3.2 + 1.6
    ms; with faiss.knn in place of numpy, 5.8 ms)."""
    scores, where = faiss.knn(np.ascontiguousarray(concepts), queries, 1, metric=faiss.METRIC_INNER_PRODUCT)
    return scores[:, 0], where[:, 0]


def rescored_scores(
    index: faiss.Index, concepts: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate candidates, exact scores: the top-``k`` ids of every query from ``index``, then the exact best
    cosine of every candidate (the union over queries) over all queries. A concept that no query returned gets
    -1.0 / -1; every concept returned gets its exact best score and position."""
    n_concepts = len(concepts)
    best = np.full(n_concepts, -1.0, dtype=np.float32)
    where = np.full(n_concepts, -1, dtype=np.int64)
    _, ids = index.search(queries, k)  # (N, k)
    cand = np.unique(ids[ids >= 0])  # (U,)
    best[cand], where[cand] = faiss_best_query(concepts[cand], queries)
    return best, where


# ---------------------------------------------------------------------------------------------- the runs


def measure_kind(
    kind: str, vectors: np.ndarray, labels, thresholds, batches, recall_batches, exact_best, exact_ids, args
) -> dict:
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    idx = ConceptIndex.build(vectors, labels, thresholds, kind=kind)
    build_s = time.perf_counter() - t0
    gc.collect()
    row = {
        "kind": kind,
        "resolved": idx.kind,
        "concepts": len(vectors),
        "build_s": round(build_s, 4),
        "index_bytes": index_bytes(idx.index),
        "rss_delta_bytes": rss_bytes() - rss0,
        "search_ms": latency_ms(lambda q: idx.search(q, min(K, len(idx))), batches, args.repeats, args.warmup),
        "concept_scores_ms": latency_ms(idx.concept_scores, batches, args.repeats, args.warmup),
    }
    if idx.kind == "hnsw":
        row["hnsw"] = {"M": atu_index.HNSW_M, "efSearch": int(idx.index.hnsw.efSearch)}
    approx = np.stack([idx.concept_scores(q)[0] for q in recall_batches])
    approx_ids = np.concatenate([idx.search(q, min(K, len(idx)))[1] for q in recall_batches])
    row["recall_at_10"] = recall_at_k(exact_ids, approx_ids)
    row["threshold_recall"] = threshold_recall(exact_best, approx, args.thresholds)
    return row


def sweep(vectors: np.ndarray, batches, recall_batches, exact_best, exact_ids, args) -> list[dict]:
    """Alternatives at one size: flat layouts, hnsw (M x efSearch, current scoring and rescoring), IVF."""
    n = len(vectors)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = [f"c{i}" for i in range(n)]
    thr = np.full(n, args.guard_threshold, np.float32)
    rows: list[dict] = []

    def record(name: str, params: dict, build_s: float | None, nbytes: int | None, scores_fn, search_fn=None):
        row = {"variant": name, "params": params, "concepts": n, "build_s": build_s, "index_bytes": nbytes}
        row["concept_scores_ms"] = latency_ms(scores_fn, batches, args.sweep_repeats, args.warmup)
        approx = np.stack([scores_fn(q)[0] for q in recall_batches])
        row["threshold_recall"] = threshold_recall(exact_best, approx, args.thresholds)
        if search_fn is not None:
            row["search_ms"] = latency_ms(search_fn, batches, args.sweep_repeats, args.warmup)
            row["recall_at_10"] = recall_at_k(exact_ids, np.concatenate([search_fn(q)[1] for q in recall_batches]))
        rows.append(row)
        tr = row["threshold_recall"][str(args.guard_threshold)]
        print(
            f"  {name:<28} {json.dumps(params):<40} scores p50 {row['concept_scores_ms']['p50']:8.2f} ms"
            f"  exact@{args.guard_threshold} {tr['exact_match']}  flagged {tr['flagged']}",
            flush=True,
        )

    flat = ConceptIndex.build(unit, labels, thr, kind="flat")
    record("flat (current layout)", {}, None, index_bytes(flat.index), flat.concept_scores)
    record("flat (C, N) layout", {}, None, None, lambda q: flat_scores_transposed(unit, q))
    record("flat, faiss.knn", {}, None, None, lambda q: faiss_best_query(unit, q))
    del flat

    for m in args.sweep_m:
        t0 = time.perf_counter()
        h = faiss.IndexHNSWFlat(DIM, m, faiss.METRIC_INNER_PRODUCT)
        h.add(unit)
        build_s = round(time.perf_counter() - t0, 2)
        nbytes = index_bytes(h)
        stored = faiss.rev_swig_ptr(faiss.downcast_index(h.storage).get_xb(), n * DIM).reshape(n, DIM)
        ci = ConceptIndex(index=h, labels=labels, thresholds=thr, kind="hnsw")
        for ef in args.sweep_ef:
            h.hnsw.efSearch = ef
            params = {"M": m, "efSearch": ef}
            record(
                "hnsw, top-64 scoring",
                params | {"k": atu_index.HNSW_SCORE_K},
                build_s,
                nbytes,
                ci.concept_scores,
                lambda q, h=h: h.search(q, K),
            )
            for k in RESCORE_KS:
                record(
                    "hnsw, rescored",
                    params | {"k": k},
                    build_s,
                    nbytes,
                    lambda q, h=h, stored=stored, k=k: rescored_scores(h, stored, q, k),
                )
        gc.collect()

    nlist = int(4 * np.sqrt(n))
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(DIM)
    ivf = faiss.IndexIVFFlat(quantizer, DIM, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(unit)
    ivf.add(unit)
    build_s = round(time.perf_counter() - t0, 2)
    nbytes = index_bytes(ivf)
    for nprobe in args.sweep_nprobe:
        ivf.nprobe = nprobe
        record(
            "ivf-flat, rescored",
            {"nlist": nlist, "nprobe": nprobe, "k": RESCORE_KS[0]},
            build_s,
            nbytes,
            lambda q: rescored_scores(ivf, unit, q, RESCORE_KS[0]),
            lambda q: ivf.search(q, K),
        )
    return rows


def _brief(row: dict) -> dict:
    return {
        "variant": row["variant"],
        "params": row["params"],
        "concepts": row["concepts"],
        "concept_scores_p50_ms": row["concept_scores_ms"]["p50"],
        "concept_scores_p99_ms": row["concept_scores_ms"]["p99"],
        "threshold_recall": row["threshold_recall"],
        "meets_target": row["concepts"] >= TARGET_CONCEPTS and row["concept_scores_ms"]["p50"] <= TARGET_MS,
    }


def recommend(sweep_rows: list[dict], guard_t: float) -> dict:
    """Two picks from the sweep: the fastest variant whose guard recall at ``guard_t`` is exact (1.0), and, among
    the variants under the latency target, the one with the best guard recall at ``guard_t`` (then the fastest)."""

    def exact(r: dict) -> float:
        return r["threshold_recall"][str(guard_t)]["exact_match"] or 0.0

    full = [r for r in sweep_rows if exact(r) == 1.0]
    fast = [r for r in sweep_rows if r["concept_scores_ms"]["p50"] <= TARGET_MS]
    return {
        "fastest_exact": _brief(min(full, key=lambda r: r["concept_scores_ms"]["p50"])) if full else None,
        "best_under_target": _brief(max(fast, key=lambda r: (exact(r), -r["concept_scores_ms"]["p50"])))
        if fast
        else None,
    }


# ---------------------------------------------------------------------------------------------- output


def _pct(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def write_markdown(result: dict, path: Path) -> None:
    meta = result["meta"]
    thresholds, guard_t = meta["thresholds"], meta["guard_threshold"]
    lines = [
        f"# Concept index scale ({meta['date']})",
        "",
        f"{meta['machine']}; faiss {meta['versions']['faiss']} with {meta['faiss_threads']} OpenMP threads, "
        f"numpy BLAS {meta['blas_threads']} threads; {BATCH} queries of dim {DIM} per call; latency over "
        f"{meta['repeats']} repeats after {meta['warmup']} warmup calls. Guard recall: among concepts whose exact "
        f"best cosine is above t, the share whose score the index finds exactly (within 1e-5).",
        "",
        "Vectors: "
        + (
            "MiniLM embeddings of person names (the embedded world's 40 people, then synthetic names); queries: "
            "MiniLM embeddings of the real 8-token future windows of the world corpus, 128 consecutive positions "
            "per batch."
            if meta["vectors"] == "names"
            else "MiniLM embeddings of one invented bio sentence per person (birthplace, year, employer, profession),"
            " the stand-in for the guard's default concept vectors (the centroid of a person's texts); queries: "
            "MiniLM embeddings of the real 8-token future windows of the world corpus, 128 consecutive positions "
            "per batch."
            if meta["vectors"] == "facts"
            else "seeded random unit vectors; queries: a quarter near concepts (concept + noise, cosine U(0.2, "
            "0.9), runs of 4), the rest random. Random vectors have no cluster structure: the worst case for "
            "graph (hnsw) and partition (ivf) indexes."
        ),
        "",
        "| concepts | kind | build s | index MiB | RSS delta MiB | search p50 / p99 ms | concept_scores p50 / p99 ms"
        f" | recall@10 | guard recall t={' / '.join(map(str, thresholds))} (n above) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["kinds"]:
        kind = r["kind"] if r["kind"] == r["resolved"] else f"{r['kind']} ({r['resolved']})"
        tr = r["threshold_recall"]
        guard = " / ".join(f"{_pct(tr[str(t)]['exact_match'])} ({tr[str(t)]['n_above']})" for t in thresholds)
        lines.append(
            f"| {r['concepts']:,} | {kind} | {r['build_s']:.3f} | {r['index_bytes'] / 2**20:.2f} | "
            f"{r['rss_delta_bytes'] / 2**20:.1f} | {r['search_ms']['p50']:.2f} / {r['search_ms']['p99']:.2f} | "
            f"{r['concept_scores_ms']['p50']:.2f} / {r['concept_scores_ms']['p99']:.2f} | "
            f"{_pct(r['recall_at_10'])} | {guard} |"
        )
    if result.get("sweep"):
        n = result["sweep"][0]["concepts"]
        lines += [
            "",
            f"## Alternatives at {n:,} concepts",
            "",
            f"Guard recall columns: exact match / still flagged, at t = {', '.join(map(str, thresholds))} (n = "
            f"concept-batch pairs above t over {RECALL_BATCHES} batches).",
            "",
            "| variant | params | build s | index MiB | concept_scores p50 / p99 ms | search p50 ms | recall@10 | "
            + " | ".join(f"t={t}" for t in thresholds)
            + " |",
            "|---|---|---:|---:|---:|---:|---:|---|---|---|",
        ]
        for r in result["sweep"]:
            tr = r["threshold_recall"]
            cells = [
                f"{_pct(tr[str(t)]['exact_match'])} / {_pct(tr[str(t)]['flagged'])} (n={tr[str(t)]['n_above']})"
                for t in thresholds
            ]
            size = "-" if r["index_bytes"] is None else f"{r['index_bytes'] / 2**20:.1f}"
            build = "-" if r["build_s"] is None else f"{r['build_s']:.1f}"
            search = f"{r['search_ms']['p50']:.2f}" if "search_ms" in r else "-"
            lines.append(
                f"| {r['variant']} | {json.dumps(r['params'])} | {build} | {size} | "
                f"{r['concept_scores_ms']['p50']:.2f} / {r['concept_scores_ms']['p99']:.2f} | {search} | "
                f"{_pct(r.get('recall_at_10'))} | {' | '.join(cells)} |"
            )
    rec = result.get("recommendation") or {}
    lines += ["", "## Target", ""]
    lines.append(
        f"128 vectors against {TARGET_CONCEPTS:,} concepts in at most {TARGET_MS:g} ms p50, with guard recall at "
        f"t={guard_t} at least {TARGET_RECALL:g}."
    )
    for r in result["kinds"]:
        if r["concepts"] == TARGET_CONCEPTS:
            recall = r["threshold_recall"][str(guard_t)]["exact_match"] or 0.0
            met = r["concept_scores_ms"]["p50"] <= TARGET_MS and recall >= TARGET_RECALL
            lines.append(
                f"- `atu.index` kind {r['kind']} ({r['resolved']}): concept_scores p50 "
                f"{r['concept_scores_ms']['p50']:.2f} ms, guard recall at t={guard_t} "
                f"{_pct(r['threshold_recall'][str(guard_t)]['exact_match'])}: {'met' if met else 'NOT met'}."
            )
    for key, what in (
        ("fastest_exact", f"Fastest variant with exact guard recall at t={guard_t}"),
        ("best_under_target", f"Best guard recall at t={guard_t} within {TARGET_MS:g} ms"),
    ):
        pick = rec.get(key)
        if pick:
            lines.append(
                f"- {what}: {pick['variant']} {json.dumps(pick['params'])} at {pick['concepts']:,} concepts, p50 "
                f"{pick['concept_scores_p50_ms']:.2f} ms, recall "
                f"{_pct(pick['threshold_recall'][str(guard_t)]['exact_match'])}"
                f"{' (meets the latency target)' if pick['meets_target'] else ''}."
            )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes up to 10,000 and a sweep at 10,000")
    ap.add_argument("--sizes", type=int, nargs="+", help="override the concept counts")
    ap.add_argument("--threads", type=int, default=2, help="FAISS OpenMP and numpy BLAS threads (default 2)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--sweep-repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sweep", action="store_true", help="skip the alternatives at the largest size")
    ap.add_argument("--sweep-m", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--sweep-ef", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--sweep-nprobe", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument(
        "--vectors",
        choices=("random", "names", "facts"),
        default="random",
        help="random unit vectors (default), or MiniLM embeddings of person names or of one invented bio sentence "
        "per person, with real corpus windows as queries",
    )
    ap.add_argument("--out-dir", type=Path, default=Path("results"))
    args = ap.parse_args(argv)
    sizes = tuple(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    args.thresholds, args.guard_threshold = THRESHOLDS[args.vectors], GUARD_THRESHOLD[args.vectors]

    faiss.omp_set_num_threads(args.threads)
    limits = threadpool_limits(args.threads, user_api="blas")
    blas_threads = sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "faiss_threads": faiss.omp_get_max_threads(),
        "blas_threads": blas_threads,
        "versions": {"atu": __version__, "faiss": faiss.__version__, "numpy": np.__version__},
        "python": platform.python_version(),
        "dim": DIM,
        "batch": BATCH,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "quick": args.quick,
        "vectors": args.vectors,
        "thresholds": list(args.thresholds),
        "guard_threshold": args.guard_threshold,
        "auto_flat_max": atu_index.AUTO_FLAT_MAX,
        "hnsw": {"M": atu_index.HNSW_M, "efSearch": atu_index.HNSW_EF_SEARCH, "score_k": atu_index.HNSW_SCORE_K},
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    print(f"faiss {faiss.__version__}: {meta['faiss_threads']} threads; BLAS threads {blas_threads}", flush=True)

    kinds: list[dict] = []
    sweep_rows: list[dict] = []
    if args.vectors in ("names", "facts"):
        all_vectors, all_batches = names_dataset(max(sizes), 8 + RECALL_BATCHES, args.seed, args.vectors == "facts")
    for n in sizes:
        rng = np.random.default_rng([args.seed, n])
        if args.vectors in ("names", "facts"):
            vectors, batches, recall_batches = all_vectors[:n], all_batches[:8], all_batches[8:]
        else:
            vectors = unit_rows(rng, n, DIM)
            batches = [guard_queries(vectors, rng) for _ in range(8)]
            recall_batches = [guard_queries(vectors, rng) for _ in range(RECALL_BATCHES)]
        labels = [f"concept-{i}" for i in range(n)]
        thresholds = np.full(n, args.guard_threshold, np.float32)
        exact_best = np.stack([exact_concept_scores(vectors, q) for q in recall_batches])  # (B, C)
        exact_ids = np.concatenate(
            [np.argsort(-(q @ vectors.T), axis=1, kind="stable")[:, : min(K, n)] for q in recall_batches]
        )
        print(f"{n:,} concepts", flush=True)
        for kind in ("flat", "hnsw", "auto"):
            row = measure_kind(kind, vectors, labels, thresholds, batches, recall_batches, exact_best, exact_ids, args)
            kinds.append(row)
            tr = row["threshold_recall"][str(args.guard_threshold)]
            print(
                f"  {kind:<5}({row['resolved']:<4}) build {row['build_s']:8.3f} s  "
                f"size {row['index_bytes'] / 2**20:8.2f} MiB  search p50 {row['search_ms']['p50']:8.2f} ms  "
                f"concept_scores p50 "
                f"{row['concept_scores_ms']['p50']:8.2f} p99 {row['concept_scores_ms']['p99']:8.2f} ms  "
                f"recall@10 {row['recall_at_10']:.3f}  guard@{args.guard_threshold} {tr['exact_match']} "
                f"(n={tr['n_above']})",
                flush=True,
            )
        if n == max(sizes) and not args.no_sweep:
            print(f"sweep at {n:,} concepts", flush=True)
            sweep_rows = sweep(vectors, batches, recall_batches, exact_best, exact_ids, args)
        del vectors, batches, recall_batches, exact_best, exact_ids
        gc.collect()
    limits.restore_original_limits()

    result = {
        "meta": meta,
        "kinds": kinds,
        "sweep": sweep_rows,
        "recommendation": recommend(sweep_rows, args.guard_threshold),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "index_scale" + ("" if args.vectors == "random" else f"_{args.vectors}") + ("_quick" if args.quick else "")
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_markdown(result, args.out_dir / f"{stem}.md")
    print(f"wrote {args.out_dir / stem}.json and .md", flush=True)
    for key, pick in result["recommendation"].items():
        if pick:
            tr = pick["threshold_recall"][str(args.guard_threshold)]
            print(
                f"{key}: {pick['variant']} {json.dumps(pick['params'])} p50 {pick['concept_scores_p50_ms']:.2f} ms, "
                f"guard recall at {args.guard_threshold} {tr['exact_match']}",
                flush=True,
            )
    return result


if __name__ == "__main__":
    main()
