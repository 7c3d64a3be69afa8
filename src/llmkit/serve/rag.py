"""Retrieval in the server (`llmkit serve --rag-store STORE`).

- `POST /v1/rag/query` `{"query": "...", "k": 5, "mode": "hybrid", "filter": {"source": "..."}}` ->
  `{"object": "list", "data": [{rank, score, source, page, headings, text, ...}, ...]}`.
- A chat request with `"rag": true` (or `{"k": 5, "mode": ..., "filter": {...}}`) retrieves for its
  last user message, prepends the numbered context blocks (rag/answer.py's grounded-answer system
  prompt) and returns the blocks as `rag_context` (in the response, or in the first stream chunk).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from llmkit.errors import LlmkitError
from llmkit.serve.errors import APIError
from llmkit.serve.protocol import ChatMessage, _Request

router = APIRouter()


class RagQueryRequest(_Request):
    query: str = Field(min_length=1)
    k: int = Field(default=5, ge=1, le=100)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    filter: dict[str, str | int | float | bool] | None = None


class RagServer:
    """An `llmkit.rag.Index` shared by requests; one retrieval at a time (SQLite + FAISS + encoder)."""

    def __init__(self, store: str):
        from llmkit.rag import Index

        self.index = Index(store)
        self.index.store()  # fail at start-up, not on the first request, when the store is missing
        _ = self.index.embedder
        self.lock = threading.Lock()

    def query(self, q: str, k: int = 5, mode: str = "hybrid", filters: dict | None = None) -> list:
        with self.lock:
            return self.index.query(q, k, mode, filters)


def _rag(request: Request) -> RagServer:
    rag = getattr(request.app.state.llmkit, "rag", None)
    if rag is None:
        raise APIError("this server has no retrieval store: start it with --rag-store STORE", 404,
                       code="rag_not_enabled")
    return rag


async def _retrieve(rag: RagServer, q: str, k: int, mode: str, filters: dict | None) -> list:
    try:
        return await asyncio.to_thread(rag.query, q, k, mode, filters)
    except LlmkitError as e:
        raise APIError(str(e), 400) from e


@router.post("/v1/rag/query")
async def rag_query(body: RagQueryRequest, request: Request):
    hits = await _retrieve(_rag(request), body.query, body.k, body.mode, body.filter)
    return {"object": "list", "data": [h.to_dict() for h in hits]}


async def augment(request: Request, body: Any) -> list[dict] | None:
    """When the chat request asks for retrieval: add the context to `body.messages`, return the blocks."""
    opts = getattr(body, "rag", None)
    if not opts:
        return None
    from llmkit.rag.answer import context_blocks, messages

    opts = opts if isinstance(opts, dict) else {}
    try:
        spec = RagQueryRequest.model_validate({"query": "-", **{k: v for k, v in opts.items() if k != "query"}})
    except ValueError as e:
        raise APIError(f"rag: {e}", 400, param="rag") from e
    users = [m for m in body.messages if m.role == "user" and m.text().strip()]
    if not users:
        raise APIError("rag needs a user message to retrieve for", 400, param="messages")
    question = users[-1].text()
    hits = await _retrieve(_rag(request), question, spec.k, spec.mode, spec.filter)
    system = messages(question, hits)[0]["content"]
    context = ChatMessage(role="system", content=f"{system}\n\nContext:\n{context_blocks(hits)}")
    body.messages = [context, *body.messages]
    return [{"n": i, **h.to_dict()} for i, h in enumerate(hits, 1)]
