"""`RagService`: an `Index` shared by a server's requests (`llmkit serve --rag-store STORE`).

The server (serve/rag.py) sits in the same layer as rag/ and does not import it: the CLI builds a
`RagService` and hands it to the server, which only calls `query` and `ground` (plain dicts out).
"""

from __future__ import annotations

import threading

from llmkit.rag.answer import context_blocks, messages
from llmkit.rag.index import Index


class RagService:
    """Retrieval for HTTP requests; one at a time (SQLite, FAISS and the encoder are shared)."""

    def __init__(self, store: str):
        self.index = Index(store)
        self.index.store()  # fail at start-up, not on the first request, when the store is missing
        _ = self.index.embedder
        self.lock = threading.Lock()

    def query(self, q: str, k: int = 5, mode: str = "hybrid", filters: dict | None = None) -> list[dict]:
        """The hits' `Hit.to_dict()`, best first."""
        with self.lock:
            return [h.to_dict() for h in self.index.query(q, k, mode, filters)]

    def ground(self, question: str, k: int = 5, mode: str = "hybrid",
               filters: dict | None = None) -> tuple[str, list[dict]]:
        """(a system message: the grounded-answer instruction + numbered context, the blocks as dicts)."""
        with self.lock:
            hits = self.index.query(question, k, mode, filters)
        system = messages(question, hits)[0]["content"] + "\n\nContext:\n" + context_blocks(hits)
        return system, [{"n": i, **h.to_dict()} for i, h in enumerate(hits, 1)]
