"""Retrieval in the server (`llmkit serve --rag-store STORE`).

`state.rag` is an `llmkit.rag.service.RagService` built by the CLI (this module does not import rag/,
which sits in the same layer): `query(...) -> [hit dicts]`, `ground(...) -> (system text, blocks)`.

- `POST /v1/rag/query` `{"query": "...", "k": 5, "mode": "hybrid", "filter": {"source": "..."}}` ->
  `{"object": "list", "data": [{rank, score, source, page, headings, text, ...}, ...]}`.
- A chat request with `"rag": true` (or `{"k": 5, "mode": ..., "filter": {...}}`) retrieves for its
  last user message, prepends the numbered context blocks (rag/answer.py's grounded-answer system
  prompt) and returns the blocks as `rag_context` (in the response, or in the first stream chunk).
"""

from __future__ import annotations

import asyncio
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


def _rag(request: Request):
    rag = getattr(request.app.state.llmkit, "rag", None)
    if rag is None:
        raise APIError("this server has no retrieval store: start it with --rag-store STORE", 404,
                       code="rag_not_enabled")
    return rag


async def _call(fn, *args):
    try:
        return await asyncio.to_thread(fn, *args)
    except LlmkitError as e:
        raise APIError(str(e), 400) from e


@router.post("/v1/rag/query")
async def rag_query(body: RagQueryRequest, request: Request):
    hits = await _call(_rag(request).query, body.query, body.k, body.mode, body.filter)
    return {"object": "list", "data": hits}


async def augment(request: Request, body: Any) -> list[dict] | None:
    """When the chat request asks for retrieval: add the context to `body.messages`, return the blocks."""
    opts = getattr(body, "rag", None)
    if not opts:
        return None
    opts = opts if isinstance(opts, dict) else {}
    try:
        spec = RagQueryRequest.model_validate({"query": "-", **{k: v for k, v in opts.items() if k != "query"}})
    except ValueError as e:
        raise APIError(f"rag: {e}", 400, param="rag") from e
    users = [m for m in body.messages if m.role == "user" and m.text().strip()]
    if not users:
        raise APIError("rag needs a user message to retrieve for", 400, param="messages")
    system, context = await _call(_rag(request).ground, users[-1].text(), spec.k, spec.mode, spec.filter)
    body.messages = [ChatMessage(role="system", content=system), *body.messages]
    return context
