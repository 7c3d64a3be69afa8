"""The embedded store: a folder with SQLite (the source of truth) plus FAISS and BM25 snapshots.

    STORE/store.sqlite   docs, chunks (text, metadata, terms, float32 vector), meta_kv (metadata
                         as indexed key/value rows, for filters), meta, deleted ids
    STORE/ann.json       {"gen", "kind", "file", "trained_n"} -> STORE/ann-<gen>.faiss
    STORE/bm25.json      {"gen", "dir"} -> STORE/bm25-<gen>/

Every write to SQLite is one transaction that also bumps `generation`. The snapshots are caches
written atomically (temp file/folder, then rename, then the small JSON pointer); one that lags the
database is caught up on open (FAISS: remove deleted ids, add chunks newer than the snapshot) or
rebuilt (BM25). So a crash at any point leaves a consistent store. The ANN index is exact
(`IndexFlatIP`) below `IVF_MIN` chunks and IVF-Flat above, nlist = 2 sqrt(N), searching 1/8 of the
lists (chosen by measurement: docs/log.md).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from llmkit.errors import InputError
from llmkit.fsutil import atomic_path, atomic_write_text, replace_dir
from llmkit.rag.keyword import BM25
from llmkit.rag.store import Hit, Store, as_text

IVF_MIN = 50_000  # below this, exact search is fast enough (~5 ms at 50k x 384)
IVF_PROBE_FRACTION = 8  # search nlist / 8 lists (at least 32): recall@10 >= 0.95 up to 1M (docs/log.md)
EXACT_FILTERED_MAX = 20_000  # a filter matching fewer chunks is searched exactly

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS docs(source TEXT PRIMARY KEY, hash TEXT NOT NULL, n_chunks INT, indexed_at REAL);
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, ord INT, page INT, headings TEXT,
    text TEXT NOT NULL, meta TEXT, terms TEXT, n_tokens INT, gen INT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_source ON chunks(source);
CREATE INDEX IF NOT EXISTS chunks_gen ON chunks(gen);
CREATE INDEX IF NOT EXISTS chunks_page ON chunks(page);
CREATE TABLE IF NOT EXISTS meta_kv(key TEXT NOT NULL, value TEXT NOT NULL, chunk_id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS meta_kv_key ON meta_kv(key, value, chunk_id);
CREATE INDEX IF NOT EXISTS meta_kv_chunk ON meta_kv(chunk_id);
CREATE TABLE IF NOT EXISTS deleted(id INTEGER PRIMARY KEY, gen INT NOT NULL);
"""


class EmbeddedStore(Store):
    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = Path(path)
        db = self.path / "store.sqlite"
        if not db.exists():
            if not create:
                raise InputError(f"--store {path}: no store there; build one with "
                                 f"`llmkit rag index --docs ... --store {path}`")
            self.path.mkdir(parents=True, exist_ok=True)
        elif self.path.is_file():
            raise InputError(f"--store {path}: is a file; expected a folder")
        self.db = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.RLock()
        self._ann = None  # (gen, faiss index, info)
        self._bm25 = None  # (gen, BM25)

    # ---- metadata -------------------------------------------------------------------------------
    def get_meta(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def set_meta(self, meta: dict) -> None:
        with self.lock:
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [(k, json.dumps(v)) for k, v in meta.items()])

    def generation(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return json.loads(row[0]) if row else 0

    def doc_hashes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT source, hash FROM docs"))

    def stats(self) -> dict:
        docs, = self.db.execute("SELECT count(*) FROM docs").fetchone()
        chunks, tokens = self.db.execute("SELECT count(*), coalesce(sum(n_tokens), 0) FROM chunks").fetchone()
        return {"documents": docs, "chunks": chunks, "tokens": tokens, "generation": self.generation()}

    # ---- writes ---------------------------------------------------------------------------------
    def write(self, docs, delete=()) -> None:
        with self.lock:
            gen = self.generation() + 1
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for source in [d[0] for d in docs] + list(delete):
                    self.db.execute("INSERT OR REPLACE INTO deleted SELECT id, ? FROM chunks WHERE source=?",
                                    (gen, source))
                    self.db.execute("DELETE FROM meta_kv WHERE chunk_id IN (SELECT id FROM chunks WHERE source=?)",
                                    (source,))
                    self.db.execute("DELETE FROM chunks WHERE source=?", (source,))
                    self.db.execute("DELETE FROM docs WHERE source=?", (source,))
                for source, digest, chunks, vectors, terms in docs:
                    first = self.db.execute("SELECT coalesce(max(id), 0) FROM chunks").fetchone()[0]
                    seq = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name='chunks'").fetchone()
                    first = max(first, seq[0] if seq else 0) + 1  # the ids AUTOINCREMENT hands out next
                    self.db.executemany(
                        "INSERT INTO chunks(id, source, ord, page, headings, text, meta, terms, n_tokens, gen, vector) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        [(first + j, source, c.ord, c.page, json.dumps(c.headings), c.text, json.dumps(c.meta),
                          " ".join(t), c.n_tokens, gen, np.ascontiguousarray(v, dtype=np.float32).tobytes())
                         for j, (c, v, t) in enumerate(zip(chunks, vectors, terms))])
                    self.db.executemany("INSERT INTO meta_kv VALUES (?,?,?)",
                                        [(k, as_text(v), first + j) for j, c in enumerate(chunks)
                                         for k, v in c.meta.items()])
                    self.db.execute("INSERT INTO docs VALUES (?,?,?,?)", (source, digest, len(chunks), time.time()))
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (json.dumps(gen),))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def finalize(self) -> None:
        with self.lock:
            gen = self.generation()
            self._ann_index(save=True)
            self._bm25_index(save=True)
            for p in self.path.iterdir():  # snapshots of older generations
                if p.name.startswith(("ann-", "bm25-")) and p.name not in (f"ann-{gen}.faiss", f"bm25-{gen}"):
                    if p.is_dir():
                        import shutil

                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
            self.db.execute("DELETE FROM deleted WHERE gen <= ?", (gen,))

    # ---- the ANN snapshot -------------------------------------------------------------------------
    def _vectors(self, where: str = "", args: tuple = (), batch: int = 50_000):
        cur = self.db.execute(f"SELECT id, vector FROM chunks {where} ORDER BY id", args)
        while rows := cur.fetchmany(batch):
            yield (np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)),
                   np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1))

    def _build_ann(self, n: int, dim: int):
        import faiss

        if n < IVF_MIN:
            index, info = faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), {"kind": "flat", "trained_n": n}
        else:
            nlist = int(2 * np.sqrt(n))
            rng = np.random.default_rng(0)
            ids = np.sort(rng.choice(np.array([r[0] for r in self.db.execute("SELECT id FROM chunks")]),
                                     min(n, 32 * nlist), replace=False))
            sample = np.concatenate([v for i, v in self._vectors()  # only the sampled rows kept
                                     for v in [v[np.isin(i, ids)]]])
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(sample)
            info = {"kind": "ivf", "trained_n": n, "nlist": nlist, "nprobe": max(32, nlist // IVF_PROBE_FRACTION)}
        for ids, vecs in self._vectors():
            index.add_with_ids(vecs, ids)
        return index, info

    def _ann_index(self, save: bool = False):
        """The FAISS index for the current generation: cached, loaded from the snapshot and caught up, or built."""
        import faiss

        gen = self.generation()
        if self._ann is not None and self._ann[0] == gen:
            return self._ann[1]
        n, = self.db.execute("SELECT count(*) FROM chunks").fetchone()
        dim = self.get_meta().get("embed_dim", 384)
        want = "flat" if n < IVF_MIN else "ivf"
        index, info, from_gen = None, None, -1
        if self._ann is not None:
            from_gen, index, info = self._ann
        else:
            ptr = self.path / "ann.json"
            if ptr.exists():
                info = json.loads(ptr.read_text())
                if (self.path / info["file"]).exists():
                    index, from_gen = faiss.read_index(str(self.path / info["file"])), info["gen"]
        if index is None or info["kind"] != want or (want == "ivf" and n > 4 * info["trained_n"]):
            index, info = self._build_ann(n, dim)
        elif from_gen != gen:  # catch up: drop deleted chunks, add new ones
            gone = np.array([r[0] for r in self.db.execute("SELECT id FROM deleted WHERE gen > ?", (from_gen,))],
                            dtype=np.int64)
            if len(gone):
                index.remove_ids(gone)
            for ids, vecs in self._vectors("WHERE gen > ?", (from_gen,)):
                index.add_with_ids(vecs, ids)  # ids are never reused (AUTOINCREMENT)
        if save and (info.get("gen") != gen or not (self.path / f"ann-{gen}.faiss").exists()):
            with atomic_path(self.path / f"ann-{gen}.faiss") as tmp:
                faiss.write_index(index, str(tmp))
            info = {**info, "gen": gen, "file": f"ann-{gen}.faiss"}
            atomic_write_text(self.path / "ann.json", json.dumps(info))
        if info["kind"] == "ivf" and index.direct_map.type != faiss.DirectMap.Hashtable:
            index.set_direct_map_type(faiss.DirectMap.Hashtable)  # id -> vector, for filtered exact search
        self._ann = (gen, index, info)
        return index

    def _bm25_index(self, save: bool = False) -> BM25:
        gen = self.generation()
        if self._bm25 is not None and self._bm25[0] == gen:
            return self._bm25[1]
        bm25 = None
        ptr = self.path / "bm25.json"
        if ptr.exists():
            info = json.loads(ptr.read_text())
            if info["gen"] == gen and (self.path / info["dir"]).exists():
                bm25 = BM25.load(self.path / info["dir"])
        if bm25 is None:
            rows = self.db.execute("SELECT id, terms FROM chunks ORDER BY id").fetchall()
            bm25 = BM25(np.array([r[0] for r in rows], dtype=np.int64), [r[1].split() for r in rows])
            if save and rows:
                tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=".bm25-"))
                bm25.save(tmp)
                replace_dir(tmp, self.path / f"bm25-{gen}")
                atomic_write_text(ptr, json.dumps({"gen": gen, "dir": f"bm25-{gen}"}))
        self._bm25 = (gen, bm25)
        return bm25

    # ---- search -----------------------------------------------------------------------------------
    def _filter_sql(self, filters: dict[str, str]) -> tuple[str, list]:
        """A WHERE clause over `chunks` for {key: value}: source/page columns, other keys via meta_kv."""
        conds, args = [], []
        for key, value in filters.items():
            if key == "source":
                conds.append("source = ?")
            elif key == "page":
                conds.append("CAST(page AS TEXT) = ?")
            else:
                conds.append("id IN (SELECT chunk_id FROM meta_kv WHERE key = ? AND value = ?)")
                args.append(key)
            args.append(value)
        return " AND ".join(conds), args

    def _allowed(self, filters: dict[str, str]) -> np.ndarray | None:
        if not filters:
            return None
        where, args = self._filter_sql(filters)
        return np.array([r[0] for r in self.db.execute(f"SELECT id FROM chunks WHERE {where}", args)], dtype=np.int64)

    def dense_search(self, vector, k, filters) -> list[tuple[int, float]]:
        import faiss

        with self.lock:
            q = np.asarray(vector, dtype=np.float32).reshape(1, -1)
            allowed = self._allowed(filters)
            index = self._ann_index()
            if allowed is not None and len(allowed) <= EXACT_FILTERED_MAX:  # exact over the matching chunks
                if not len(allowed):
                    return []
                scores = index.reconstruct_batch(allowed) @ q[0]
                top = np.argsort(-scores)[:k]
                return [(int(allowed[i]), float(scores[i])) for i in top]
            if index.ntotal == 0:
                return []
            info = self._ann[2]
            params = faiss.SearchParametersIVF(nprobe=info["nprobe"]) if info["kind"] == "ivf" else None
            if allowed is not None:
                sel = faiss.IDSelectorBatch(allowed)
                params = params or faiss.SearchParameters()
                params.sel = sel
            scores, ids = index.search(q, min(k, index.ntotal), params=params)
            return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def keyword_search(self, query, k, filters) -> list[tuple[int, float]]:
        with self.lock:
            return self._bm25_index().search(query, k, self._allowed(filters))

    def get(self, ids) -> dict[int, Hit]:
        if not ids:
            return {}
        rows = self.db.execute(
            f"SELECT id, text, source, page, headings, meta FROM chunks WHERE id IN ({','.join('?' * len(ids))})",
            [int(i) for i in ids])
        return {r[0]: Hit(r[0], r[1], r[2], r[3], json.loads(r[4] or "[]"), json.loads(r[5] or "{}")) for r in rows}

    def close(self) -> None:
        self.db.close()
