"""Copy an embedded RAG store (chunks, vectors, terms, metadata) into another store, without re-embedding.

Used to evaluate the PostgreSQL + pgvector store on the same chunks and vectors as an embedded one
(`llmkit rag eval` on both), since embedding the lm-eval corpus again takes minutes to an hour here:

    python benchmarks/rag_copy_store.py /tmp/lmeval-store --pgserver /tmp/lmeval-pg   # prints the URI
    llmkit rag eval --store "$URI" --qrels benchmarks/data/rag_lmeval_qrels.jsonl
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

import numpy as np

from llmkit.rag.chunk import Chunk
from llmkit.rag.store import open_store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path, help="an embedded store folder")
    ap.add_argument("dst", nargs="?", help="the target store (a folder or postgresql:// URI)")
    ap.add_argument("--pgserver", type=Path, help="start (or reuse) a pgserver PostgreSQL in this folder as the target")
    args = ap.parse_args()
    if args.pgserver:
        import pgserver

        args.pgserver.mkdir(parents=True, exist_ok=True)
        args.pgserver.chmod(0o777)  # pgserver runs PostgreSQL as its own user
        args.dst = pgserver.get_server(args.pgserver / "pg", cleanup_mode=None).get_uri()
    db = sqlite3.connect(args.src / "store.sqlite")
    dst = open_store(args.dst, create=True)
    dst.set_meta({k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta") if k != "generation"})
    docs = []
    for source, digest in db.execute("SELECT source, hash FROM docs ORDER BY source").fetchall():
        rows = db.execute("SELECT ord, page, headings, text, meta, terms, n_tokens, vector FROM chunks "
                          "WHERE source = ? ORDER BY id", (source,)).fetchall()
        chunks = [Chunk(text, source, ord_, page, json.loads(h or "[]"), json.loads(m or "{}"), n_tok)
                  for ord_, page, h, text, m, _, n_tok, _ in rows]
        vectors = np.stack([np.frombuffer(r[7], dtype=np.float32) for r in rows]) if rows else np.zeros((0, 1))
        docs.append((source, digest, chunks, vectors, [(r[5] or "").split() for r in rows]))
    dst.write(docs)
    dst.finalize()
    print(json.dumps({"store": args.dst, **dst.stats()}))
    dst.close()


if __name__ == "__main__":
    main()
