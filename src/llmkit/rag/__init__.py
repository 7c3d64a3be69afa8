"""Retrieval-augmented generation: load, chunk, embed, store, retrieve (hybrid), answer with citations.

`Index(store).add(paths)`, `.query(q, k)`, `.ask(q, model)`, `.evaluate(qrels)`; see docs/rag.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Index": "llmkit.rag.index",
    "Hit": "llmkit.rag.store",
    "Answer": "llmkit.rag.answer",
    "open_store": "llmkit.rag.store",
    "EmbeddingMismatchError": "llmkit.rag.embedder",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmkit.rag' has no attribute {name!r}")
