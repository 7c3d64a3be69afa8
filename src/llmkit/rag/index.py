"""`Index`: the RAG Python API over a store: add documents, query, ask, evaluate."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from llmkit.errors import InputError
from llmkit.fsutil import sha256_file
from llmkit.rag import answer as answer_mod
from llmkit.rag.chunk import chunk_document, token_counter
from llmkit.rag.embedder import EmbeddingMismatchError, OpenAIEmbedder, make_embedder
from llmkit.rag.keyword import tokenize
from llmkit.rag.loaders import EXTENSIONS, find_files, load_document
from llmkit.rag.retrieve import mmr, rrf
from llmkit.rag.store import Hit, Store, open_store, parse_filters

MODES = ("hybrid", "dense", "bm25")


class Index:
    """A RAG index over a store (a folder path or a `postgresql://` URI).

        idx = Index("my-store")
        idx.add(["docs/"])                 # incremental: only new or changed files
        hits = idx.query("how do I ...", k=5)
        ans = idx.ask("how do I ...", model="path/to/chat-model")

    The embedder is `embed_model` (an encoder folder), `embed_url` (an OpenAI-compatible server) or,
    by default, the one recorded in the store (for a new store: all-MiniLM-L6-v2).
    """

    def __init__(self, store: str | os.PathLike | Store, embed_model: str | os.PathLike | None = None,
                 embed_url: str | None = None, embed_name: str | None = None):
        self._store = store if isinstance(store, Store) else None
        self.uri = None if self._store else str(store)
        self._embed_args = (embed_model, embed_url, embed_name)
        self._embedder = None

    # ---- plumbing ---------------------------------------------------------------------------------
    def store(self, create: bool = False) -> Store:
        if self._store is None:
            self._store = open_store(self.uri, create=create)
        return self._store

    @property
    def embedder(self):
        """The embedder, checked against the one recorded in the store (a mismatch is an error)."""
        if self._embedder is None:
            try:
                meta = self.store().get_meta()
            except InputError:  # no store yet: `add` creates it with this embedder
                meta = {}
            model, url, name = self._embed_args
            if not (model or url) and meta.get("embed_kind") == "openai":
                url, name = meta["embed_location"], meta["embed_name"]
            elif not (model or url) and meta.get("embed_kind") == "local":
                model = meta["embed_location"]
                if not Path(model).is_dir():
                    raise InputError(f"the store was embedded with {meta['embed_name']} at {model}, which is gone; "
                                     "pass --embed-model DIR with the same model")
            emb = make_embedder(model, url, name)
            if meta.get("embed_name") and (meta["embed_name"], meta["embed_dim"]) != (emb.name, emb.dim):
                raise EmbeddingMismatchError(
                    f"the store was embedded with {meta['embed_name']!r} (dim {meta['embed_dim']}) but the embedder "
                    f"is {emb.name!r} (dim {emb.dim}); query with the same model, or re-index into a new store")
            self._embedder = emb
        return self._embedder

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- ingest -----------------------------------------------------------------------------------
    def add(self, paths: list[str | os.PathLike] | str, chunk_size: int = 200, chunk_overlap: int = 20,
            batch_size: int = 256, progress: bool = True, text_field: str = "text") -> dict:
        """Index the supported files under `paths`: new or changed ones (by content hash) are (re)chunked
        and embedded, files gone from under `paths` are removed. Returns a summary."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
        files = find_files(paths)
        store = self.store(create=True)
        emb = self.embedder
        meta = store.get_meta()
        if not meta.get("embed_name"):
            store.set_meta({"embed_kind": "openai" if isinstance(emb, OpenAIEmbedder) else "local",
                            "embed_name": emb.name, "embed_location": emb.location, "embed_dim": emb.dim})
        settings = f"chunks {chunk_size}/{chunk_overlap}"
        store.set_meta({"chunk_size": chunk_size, "chunk_overlap": chunk_overlap})
        old = store.doc_hashes()
        todo = [(src, p, sha256_file(p) + " " + settings) for src, p in files]
        todo = [t for t in todo if old.get(t[0]) != t[2]]
        found = {src for src, _ in files}
        roots = [os.path.normpath(str(p)) for p in paths]
        gone = [s for s in old if s not in found and any(_under(s, r) for r in roots)]
        if not files and not gone:
            raise InputError(f"no supported files under {' '.join(map(str, paths))}; expected "
                             f"{' '.join(EXTENSIONS)}")
        count = token_counter(emb.count_tokens)
        n_chunks = n_tokens = 0
        pending: list = []

        def flush(delete=()):
            nonlocal pending
            chunks = [c for _, _, cs in pending for c in cs]
            vecs = emb([c.embed_text() for c in chunks]) if chunks else None
            docs, i = [], 0
            for src, digest, cs in pending:
                docs.append((src, digest, cs, vecs[i : i + len(cs)] if cs else [],
                             [tokenize(c.embed_text()) for c in cs]))
                i += len(cs)
            store.write(docs, delete)
            pending = []

        bar = tqdm(total=len(todo), desc="rag index", unit="doc", disable=not progress or not todo)
        try:
            if gone:
                store.write([], gone)
            for src, p, digest in todo:
                chunks = chunk_document(load_document(src, p, text_field), count, chunk_size, chunk_overlap)
                pending.append((src, digest, chunks))
                n_chunks += len(chunks)
                n_tokens += sum(c.n_tokens for c in chunks)
                if sum(len(cs) for _, _, cs in pending) >= batch_size:
                    flush()
                bar.update(1)
                bar.set_postfix(chunks=n_chunks)
            if pending:
                flush()
        finally:
            bar.close()
        store.finalize()
        total = store.stats()
        return {"documents": len(files), "indexed": len(todo), "unchanged": len(files) - len(todo),
                "deleted": len(gone), "chunks": n_chunks, "tokens": n_tokens, "store_chunks": total["chunks"],
                "seconds": round(time.perf_counter() - t0, 3)}

    # ---- retrieval --------------------------------------------------------------------------------
    def query(self, q: str, k: int = 5, mode: str = "hybrid", filters: dict | list[str] | None = None,
              use_mmr: bool = False, mmr_lambda: float = 0.5) -> list[Hit]:
        """The `k` best chunks for `q`, best first. mode: hybrid (BM25 + dense, RRF), dense or bm25."""
        if mode not in MODES:
            raise InputError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        if not isinstance(q, str) or not q.strip():
            raise InputError("the question is empty; expected some text")
        if k < 1:
            raise InputError(f"k={k}: expected at least 1")
        store, filters = self.store(), parse_filters(filters)
        n = max(4 * k, 20) if (mode == "hybrid" or use_mmr) else k
        ranked: list[tuple[int, float]] = []
        if mode in ("dense", "hybrid"):
            qv = self.embedder([q])[0]
            ranked = store.dense_search(qv, n, filters)
        if mode in ("bm25", "hybrid"):
            kw = store.keyword_search(q, n, filters)
            ranked = kw if mode == "bm25" else rrf([ranked, kw])
        hits_by_id = store.get([i for i, _ in ranked])
        hits = []
        for i, s in ranked:
            if i in hits_by_id:
                hits.append(hits_by_id[i])
                hits[-1].score = s
        if use_mmr and hits:
            qv = self.embedder([q])[0]
            texts = [(" > ".join(h.headings) + "\n" if h.headings else "") + h.text for h in hits]
            order = mmr(qv, self.embedder(texts), k, mmr_lambda)
            hits = [hits[i] for i in order]
        hits = hits[:k]
        for r, h in enumerate(hits, 1):
            h.rank = r
        return hits

    # ---- answers ----------------------------------------------------------------------------------
    def ask_stream(self, q: str, model=None, tokenizer=None, base_url: str | None = None, k: int = 5,
                   mode: str = "hybrid", filters=None, max_tokens: int = 256, served_model: str | None = None,
                   **sampling) -> tuple[list[Hit], Iterator[str]]:
        """(context hits, text deltas) of a grounded answer from a model folder/object or an OpenAI server."""
        if (model is None) == (base_url is None):
            raise InputError("ask needs exactly one of model (a folder or a loaded model) or base_url")
        hits = self.query(q, k, mode, filters)
        if not hits:
            return hits, iter([answer_mod.NO_ANSWER])
        if base_url is not None:
            return hits, answer_mod.stream_openai(base_url, q, hits, served_model, max_tokens, **sampling)
        if isinstance(model, str | os.PathLike):
            from llmkit.model.hf import load_model
            from llmkit.tokenizer import load_tokenizer

            model, tokenizer = load_model(model), tokenizer or load_tokenizer(model)
        if tokenizer is None:
            raise InputError("ask with a loaded model also needs its tokenizer")
        return hits, answer_mod.stream_local(model, tokenizer, q, hits, max_tokens, **sampling)

    def ask(self, q: str, model=None, **kw) -> answer_mod.Answer:
        """A grounded answer whose [n] citations map to the returned context hits (`Answer.sources()`)."""
        hits, deltas = self.ask_stream(q, model, **kw)
        text = "".join(deltas)
        return answer_mod.Answer(text, hits, answer_mod.citations(text, len(hits)))

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self, qrels, k: int = 10, modes=MODES, depth: int = 50) -> dict:
        """Retrieval quality on labelled questions: {mode: {recall@k, mrr, ndcg@10, ...}} (see rag/evaluate.py)."""
        from llmkit.rag.evaluate import evaluate, load_qrels

        items = load_qrels(qrels) if isinstance(qrels, str | os.PathLike) else qrels
        return {m: evaluate(lambda q, m=m: self.query(q, depth, m), items, k) for m in modes}


def _under(source: str, root: str) -> bool:
    s = os.path.normpath(source)
    return s == root or s.startswith(root.rstrip(os.sep) + os.sep) or root == "."

