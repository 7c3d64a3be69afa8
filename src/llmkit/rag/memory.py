"""`StoreMemory`: an agent's long-term memory in a RAG store (`llmkit agent run --memory-store STORE`).

Each fact is a one-chunk document (`memory:<sha256>`) embedded with the store's embedder; recall is the
store's hybrid retrieval. It has the `add(fact)` / `search(query, k)` / `len()` interface of
`agent/memory.py: LongTermMemory`; the CLI builds it and hands it to the agent (agent/ and rag/ share a
layer and do not import each other).
"""

from __future__ import annotations

import hashlib
import os

from llmkit.errors import InputError
from llmkit.rag.chunk import Chunk
from llmkit.rag.embedder import OpenAIEmbedder
from llmkit.rag.index import Index
from llmkit.rag.keyword import tokenize


class StoreMemory:
    """Facts in a RAG store (a folder or a `postgresql://` URI), created on the first `add`."""

    def __init__(self, store: str | os.PathLike, embed_model: str | os.PathLike | None = None):
        self.index = Index(store, embed_model)

    def __len__(self) -> int:
        try:
            return self.index.store().stats()["chunks"]
        except InputError:  # no store yet
            return 0

    def add(self, fact: str) -> None:
        fact = fact.strip()
        if not fact:
            raise InputError("a fact to remember must be non-empty text")
        store = self.index.store(create=True)
        emb = self.index.embedder
        if not store.get_meta().get("embed_name"):
            store.set_meta({"embed_kind": "openai" if isinstance(emb, OpenAIEmbedder) else "local",
                            "embed_name": emb.name, "embed_location": emb.location, "embed_dim": emb.dim})
        digest = hashlib.sha256(fact.encode()).hexdigest()
        source = f"memory:{digest[:16]}"
        if source in store.doc_hashes():
            return
        chunk = Chunk(fact, source, 0, n_tokens=emb.count_tokens(fact))
        store.write([(source, digest, [chunk], emb([fact]), [tokenize(fact)])])
        store.finalize()

    def search(self, query: str, k: int = 3) -> list[tuple[str, float]]:
        if len(self) == 0 or k <= 0:
            return []
        return [(h.text, h.score) for h in self.index.query(query, k)]

    def close(self) -> None:
        self.index.close()
