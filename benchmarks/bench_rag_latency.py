"""Benchmark: query latency p50/p99 of the RAG stores at 10k, 100k and 1M chunks.

Chunks are synthetic: 384-d vectors from `bench_rag_ann.synthetic` (MiniLM-like neighbour structure)
and 40 words of text drawn from a Zipf vocabulary, written through the real store classes
(`EmbeddedStore` / `PgStore`.write + finalize). Timed per query, one at a time, after warm-up:
`dense` (ANN search + metadata fetch), `bm25` (keyword search + fetch) and `hybrid` (both + RRF),
without the query embedding (MiniLM takes ~5-10 ms per query on this CPU, the same for every
store). Dense recall@10 against exact search is printed too. Besides wall-clock time, the client
process's CPU time per query is printed: on a loaded shared box it is what a query costs on an idle
core (for pgvector the work is in the server, so only wall-clock counts).

    nice python benchmarks/bench_rag_latency.py --sizes 10000 100000 1000000 --store embedded
    nice python benchmarks/bench_rag_latency.py --sizes 10000 100000 --store pgvector   # starts pgserver
    # build once at low priority, time the queries later (pgserver's PostgreSQL is started by this
    # process, so under `chrt` it inherits the real-time policy):
    nice -n 10 python benchmarks/bench_rag_latency.py --sizes 1000000 --store pgvector --keep /tmp/rag --build-only
    chrt -f 10 python benchmarks/bench_rag_latency.py --sizes 1000000 --store pgvector --keep /tmp/rag
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_rag_ann import synthetic  # noqa: E402

from llmkit.rag.chunk import Chunk  # noqa: E402
from llmkit.rag.retrieve import rrf  # noqa: E402


def words(rng, vocab: int, n: int, length: int) -> list[list[str]]:
    ranks = np.minimum(rng.zipf(1.2, size=(n, length)), vocab) - 1
    return [[f"w{r}" for r in row] for row in ranks]


def watch_index_build(uri: str, stop, every: float = 30.0) -> None:
    """Print PostgreSQL's CREATE INDEX progress (phase, tuples or blocks done) every `every` seconds."""
    import psycopg

    with psycopg.connect(uri, autocommit=True) as conn:
        while not stop.wait(every):
            for phase, td, tt, bd, bt in conn.execute(
                    "SELECT phase, tuples_done, tuples_total, blocks_done, blocks_total "
                    "FROM pg_stat_progress_create_index").fetchall():
                print(f"  [{time.strftime('%H:%M:%S')}] index build: {phase}; tuples {td:,}/{tt:,}, "
                      f"blocks {bd:,}/{bt:,}", flush=True)


def fill(store, n: int, rng, per_doc: int = 100, batch_docs: int = 100) -> float:
    t0 = time.perf_counter()
    store.set_meta({"embed_dim": 384, "embed_name": "synthetic"})
    for start in range(0, n, per_doc * batch_docs):
        m = min(per_doc * batch_docs, n - start)
        vecs = synthetic(m, seed=1000 + start)
        terms = words(rng, 50_000, m, 40)
        docs = []
        for d in range(0, m, per_doc):
            src = f"doc{(start + d) // per_doc}.txt"
            cs = [Chunk(" ".join(terms[i]), src, i - d, meta={"shard": str((start + d) // per_doc % 10)})
                  for i in range(d, min(d + per_doc, m))]
            docs.append((src, "h", cs, vecs[d : d + len(cs)], terms[d : d + len(cs)]))
        store.write(docs)
        if (start // (per_doc * batch_docs)) % 10 == 9:
            print(f"  [{time.strftime('%H:%M:%S')}] loaded {start + m:,} chunks", flush=True)
    t1 = time.perf_counter()
    print(f"  loaded {n:,} chunks in {t1 - t0:.0f} s; building the search indexes", flush=True)
    stop, watcher = threading.Event(), None
    if hasattr(store, "conn"):  # pgvector: report the server's index build progress
        uri = store.conn.info.dsn
        watcher = threading.Thread(target=watch_index_build, args=(uri, stop), daemon=True)
        watcher.start()
    try:
        store.finalize()
    finally:
        stop.set()
    print(f"  indexes built in {time.perf_counter() - t1:.0f} s", flush=True)
    return time.perf_counter() - t0


def timed(fn, queries) -> tuple[float, float, float, float]:
    """Wall-clock p50/p99 ms and this process's CPU-time p50/p99 ms (what a query costs on an idle core)."""
    lat, cpu = [], []
    for q in queries:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(q)
        lat.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return (float(np.percentile(lat, 50)), float(np.percentile(lat, 99)),
            float(np.percentile(cpu, 50)), float(np.percentile(cpu, 99)))


def bench(store, n: int, queries: int, k: int = 10, keep: Path | None = None, build_only: bool = False) -> dict:
    rng = np.random.default_rng(0)
    done = keep / "build.json" if keep else None
    if done is not None and done.exists():  # built by an earlier --keep run (e.g. at nice 10)
        build = json.loads(done.read_text())["build_s"]
        for start in range(0, n, 10_000):  # advance the random stream as fill() does: the same queries
            rng.zipf(1.2, size=(min(10_000, n - start), 40))
        print(f"reusing {n:,} chunks built in {build:.0f} s", flush=True)
        if build_only:
            store.finalize()  # what a newer store version adds (pgvector: the term statistics)
    else:
        build = fill(store, n, rng)
        if done is not None:
            done.write_text(json.dumps({"build_s": build}))
    if build_only:
        return {"n": n, "build_s": build}
    print(f"built {n:,} chunks in {build:.0f} s; querying (pid {os.getpid()})", flush=True)
    qv = synthetic(queries, seed=7)
    qt = [" ".join(w[:3]) for w in words(rng, 2000, queries, 3)]
    for i in range(5):  # warm-up: load snapshots, caches
        store.dense_search(qv[i], k, {})
        store.keyword_search(qt[i], k, {})

    def dense(i):
        return store.get([j for j, _ in store.dense_search(qv[i], k, {})])

    def bm25(i):
        return store.get([j for j, _ in store.keyword_search(qt[i], k, {})])

    def hybrid(i):
        fused = rrf([store.dense_search(qv[i], 4 * k, {}), store.keyword_search(qt[i], 4 * k, {})])[:k]
        return store.get([j for j, _ in fused])

    def dense_filtered(i):
        return store.get([j for j, _ in store.dense_search(qv[i], k, {"shard": "3"})])

    out = {"n": n, "build_s": build}
    for name, fn in (("dense", dense), ("bm25", bm25), ("hybrid", hybrid), ("dense+filter", dense_filtered)):
        out[name] = timed(fn, range(queries))
    return out


def exact_recall(store, n: int, queries: int, k: int = 10) -> float:
    """recall@10 of the store's dense search against brute force over the same vectors."""
    vecs = np.concatenate([synthetic(min(10_000, n - s), seed=1000 + s) for s in range(0, n, 10_000)])
    qv = synthetic(queries, seed=7)
    truth = np.argsort(-(vecs @ qv.T), axis=0)[:k].T  # row positions = id - 1 (ids start at 1, in order)
    got = [[j - 1 for j, _ in store.dense_search(q, k, {})] for q in qv]
    return float(np.mean([len(set(g) & set(t)) / k for g, t in zip(got, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--store", choices=["embedded", "pgvector"], default="embedded")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--keep", type=Path, help="keep the built stores under this folder and reuse them next time")
    ap.add_argument("--build-only", action="store_true", help="build (and --keep) the stores, time no queries")
    args = ap.parse_args()
    import logging

    import faiss

    logging.basicConfig(level=logging.WARNING, format="  %(message)s")
    logging.getLogger("llmkit").setLevel(logging.INFO)

    faiss.omp_set_num_threads(1)
    rows = []
    for n in args.sizes:
        tmp = args.keep / f"{args.store}-{n}" if args.keep else Path(tempfile.mkdtemp(prefix="rag-bench-"))
        tmp.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o777)  # pgserver runs PostgreSQL as its own user
        srv = None
        try:
            if args.store == "embedded":
                from llmkit.rag.embedded import EmbeddedStore

                store = EmbeddedStore(tmp / "store", create=True)
            else:
                import pgserver

                from llmkit.rag.pgvector import PgStore

                srv = pgserver.get_server(tmp / "pg", cleanup_mode="stop" if args.keep else "delete")
                store = PgStore(srv.get_uri(), create=True)
            r = bench(store, n, args.queries, keep=tmp if args.keep else None, build_only=args.build_only)
            if args.build_only:
                store.close()
                print(f"{args.store} n={n:,}: built in {r['build_s']:.0f} s", flush=True)
                continue
            r["recall@10"] = exact_recall(store, n, min(args.queries, 100)) if n <= 1_000_000 else float("nan")
            store.close()
            rows.append(r)
            print(f"{args.store} n={n:,}: built in {r['build_s']:.0f} s; " + ", ".join(
                f"{m} p50 {r[m][0]:.1f} / p99 {r[m][1]:.1f} ms (CPU {r[m][2]:.1f} / {r[m][3]:.1f})"
                for m in ("dense", "bm25", "hybrid", "dense+filter"))
                + f"; dense recall@10 {r['recall@10']:.3f} (load average {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            if srv is not None:
                srv.cleanup()
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
    print("\nwall-clock p50 / p99 ms [client CPU-time p50 / p99 ms]")
    print("| store | chunks | dense | bm25 | hybrid | filtered dense (10%) | dense recall@10 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[m][0]:.1f} / {r[m][1]:.1f} [{r[m][2]:.1f} / {r[m][3]:.1f}]"
                 for m in ("dense", "bm25", "hybrid", "dense+filter")]
        print(f"| {args.store} | {r['n']:,} | " + " | ".join(cells) + f" | {r['recall@10']:.3f} |")


if __name__ == "__main__":
    main()
