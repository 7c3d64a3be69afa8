"""Benchmark: ANN engines for the embedded RAG store, at N synthetic 384-d unit vectors.

Candidates: exact FAISS `IndexFlatIP`, FAISS HNSW (M=32), FAISS IVF-Flat (nlist = 2 sqrt N) at a few
nprobe values, and LanceDB's IVF-PQ when `lancedb` is installed. For each: build seconds, single-query
latency p50/p99 (one query at a time, one thread) and recall@10 against exact search. On a loaded
shared box wall-clock latency mostly measures waiting for a core, so the p50 of the process's CPU
time per query is printed beside it (LanceDB's CPU time includes its worker threads).

Vectors: see `synthetic` (`--data lowrank`, MiniLM-like neighbour similarities, or `--data gaussian`,
a worst case); queries are fresh draws from the same distribution.

    nice python benchmarks/bench_rag_ann.py --n 100000 [--data gaussian]
    nice python benchmarks/bench_rag_ann.py --n 1000000
"""

from __future__ import annotations

import argparse
import gc
import time

import faiss
import numpy as np


def synthetic(n: int, kind: str = "lowrank", dim: int = 384, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """`n` unit vectors `[n, dim]` float32.

    lowrank: 1,000 overlapping clusters in a 48-d latent space mapped to `dim` plus isotropic noise (median
    cosine to the nearest neighbour ~0.63 at 100k, ~0 between random pairs, as for MiniLM sentences).
    gaussian: 2,000 isotropic clusters in `dim` with noise as large as the centers (a worst case: the 10
    nearest neighbours are nearly tied).
    """
    rng, fixed = np.random.default_rng(seed), np.random.default_rng(123)  # same mixture for data and queries
    rank = 48 if kind == "lowrank" else dim
    W = fixed.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    centers = fixed.standard_normal((1000 if kind == "lowrank" else 2000, rank)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        z = centers[rng.integers(0, len(centers), m)] + rng.standard_normal((m, rank), dtype=np.float32)
        x = z @ W + 0.5 * rng.standard_normal((m, dim), dtype=np.float32) if kind == "lowrank" else z
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed_queries(search, queries: np.ndarray, k: int) -> tuple[np.ndarray, str, float]:
    """Ids found; p50 ms of wall-clock time with the p50 of CPU time in brackets; p99 wall-clock ms."""
    ids, lat, cpu = [], [], []
    for q in queries:
        t0, c0 = time.perf_counter(), time.process_time()
        ids.append(search(q[None], k))
        lat.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return np.stack(ids), f"{np.percentile(lat, 50):.2f} [{np.percentile(cpu, 50):.2f}]", float(np.percentile(lat, 99))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--data", choices=["lowrank", "gaussian"], default="lowrank")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    ap.add_argument("--skip", nargs="*", default=[], help="candidates to skip: flat hnsw ivf lancedb")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    xb = synthetic(args.n, args.data)
    xq = synthetic(args.queries, args.data, seed=1)
    print(f"N={args.n:,} dim=384 data={args.data} made in {time.perf_counter() - t0:.1f} s")

    exact = faiss.IndexFlatIP(384)
    exact.add(xb)
    faiss.omp_set_num_threads(2)
    _, truth = exact.search(xq, args.k)
    faiss.omp_set_num_threads(1)
    rows = []
    if "flat" not in args.skip:
        ids, p50, p99 = timed_queries(lambda q, k: exact.search(q, k)[1][0], xq[:50], args.k)
        rows.append(("faiss Flat (exact)", 0.0, p50, p99, recall(ids, truth[:50])))
    exact = None  # free the memory
    gc.collect()

    if "ivf" not in args.skip:
        nlist = int(2 * np.sqrt(args.n))
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(2)
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(384), 384, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        ivf.train(xb[rng.choice(args.n, min(args.n, 32 * nlist), replace=False)])
        ivf.add(xb)
        faiss.omp_set_num_threads(1)
        build = time.perf_counter() - t0
        for nprobe in args.nprobe:
            ivf.nprobe = nprobe
            ids, p50, p99 = timed_queries(lambda q, k: ivf.search(q, k)[1][0], xq, args.k)
            rows.append((f"faiss IVF{nlist},Flat nprobe={nprobe}", build, p50, p99, recall(ids, truth)))
        del ivf
        gc.collect()

    if "hnsw" not in args.skip:
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(2)
        hnsw = faiss.IndexHNSWFlat(384, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 40
        hnsw.add(xb)
        faiss.omp_set_num_threads(1)
        build = time.perf_counter() - t0
        for ef in (32, 64, 128):
            hnsw.hnsw.efSearch = ef
            ids, p50, p99 = timed_queries(lambda q, k: hnsw.search(q, k)[1][0], xq, args.k)
            rows.append((f"faiss HNSW32 efSearch={ef}", build, p50, p99, recall(ids, truth)))
        del hnsw
        gc.collect()

    if "lancedb" not in args.skip:
        try:
            import lancedb
            import pyarrow as pa
        except ImportError:
            print("lancedb not installed: skipped")
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                db = lancedb.connect(tmp)
                vec = pa.FixedSizeListArray.from_arrays(pa.array(xb.reshape(-1)), 384)
                tbl = db.create_table("t", pa.table({"id": np.arange(args.n), "vector": vec}))
                parts = max(1, int(np.sqrt(args.n)))
                tbl.create_index(metric="cosine", num_partitions=parts, num_sub_vectors=48)
                build = time.perf_counter() - t0
                for nprobes in (20, 50):
                    def search(q, k, nprobes=nprobes):
                        r = tbl.search(q[0]).metric("cosine").nprobes(nprobes).refine_factor(5).limit(k)
                        return r.to_arrow()["id"].to_numpy()
                    ids, p50, p99 = timed_queries(search, xq, args.k)
                    rows.append((f"LanceDB IVF{parts},PQ48 nprobes={nprobes} refine=5", build, p50, p99,
                                 recall(ids, truth)))

    print(f"\n{'engine':45s} {'build s':>8s} {'p50 ms [CPU]':>16s} {'p99 ms':>8s} {'recall@10':>9s}")
    for name, build, p50, p99, r in rows:
        print(f"{name:45s} {build:8.1f} {p50:>16s} {p99:8.2f} {r:9.3f}")


if __name__ == "__main__":
    main()
