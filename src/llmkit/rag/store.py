"""The store interface shared by the embedded store (a folder) and PostgreSQL + pgvector.

A store keeps documents (source -> content hash) and their chunks (text, page, heading trail,
metadata, search terms, embedding). Writes replace whole documents in one transaction, so an
interrupted indexing run leaves every document either fully old or fully new.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from llmkit.errors import InputError
from llmkit.rag.chunk import Chunk


@dataclass
class Hit:
    """A retrieved chunk."""

    id: int
    text: str
    source: str
    page: int | None
    headings: list[str]
    meta: dict = field(default_factory=dict)
    score: float = 0.0
    rank: int = 0

    def to_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 6), "source": self.source, "page": self.page,
                "headings": self.headings, "text": self.text, "meta": self.meta, "id": self.id}

    def citation(self) -> str:
        where = self.source + (f", page {self.page}" if self.page is not None else "")
        return where + (f" > {' > '.join(self.headings)}" if self.headings else "")


def parse_filters(items: list[str] | dict | None) -> dict[str, str]:
    """`["key=value", ...]` (the CLI's --filter) or a dict -> {key: value as text}."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): as_text(v) for k, v in items.items()}
    out = {}
    for it in items:
        key, sep, value = it.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--filter {it!r}: expected key=value, e.g. source=docs/intro.md or page=3")
        out[key.strip()] = value
    return out


def as_text(v) -> str:
    return json.dumps(v) if isinstance(v, bool) else str(v)


class Store(ABC):
    """One interface for every backend (see the module docstring)."""

    @abstractmethod
    def get_meta(self) -> dict: ...

    @abstractmethod
    def set_meta(self, meta: dict) -> None: ...

    @abstractmethod
    def doc_hashes(self) -> dict[str, str]: ...

    @abstractmethod
    def write(self, docs: list[tuple[str, str, list[Chunk], np.ndarray, list[list[str]]]],
              delete: list[str] = ()) -> None:
        """In one transaction: replace each (source, hash, chunks, vectors [n, dim], terms) and delete sources."""

    @abstractmethod
    def finalize(self) -> None:
        """Bring the search indexes up to date with the committed chunks (after an indexing run)."""

    @abstractmethod
    def dense_search(self, vector: np.ndarray, k: int, filters: dict[str, str]) -> list[tuple[int, float]]: ...

    @abstractmethod
    def keyword_search(self, query: str, k: int, filters: dict[str, str]) -> list[tuple[int, float]]: ...

    @abstractmethod
    def get(self, ids: list[int]) -> dict[int, Hit]: ...

    @abstractmethod
    def stats(self) -> dict: ...

    def close(self) -> None:  # noqa: B027 (optional for backends)
        """Release connections (optional)."""


def open_store(uri: str, create: bool = False) -> Store:
    """A folder path (the embedded store) or a `postgresql://` URI."""
    uri = str(uri)
    if uri.startswith(("postgresql://", "postgres://")):
        from llmkit.rag.pgvector import PgStore

        return PgStore(uri, create=create)
    if "://" in uri:
        raise InputError(f"--store {uri!r}: expected a folder path or a postgresql:// URI")
    from llmkit.rag.embedded import EmbeddedStore

    return EmbeddedStore(uri, create=create)
