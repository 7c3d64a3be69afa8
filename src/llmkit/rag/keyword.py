"""Keyword retrieval: a tokenizer that handles Chinese, and BM25 (bm25s) over a store's chunks.

Latin-script text is lower-cased and split into words of 2+ characters minus English stop words;
runs of CJK characters are segmented with jieba (search mode, so both words and their parts match).
"""

from __future__ import annotations

import logging
import re

import numpy as np

_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+|[^\W_]+", re.U)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_stopwords: frozenset[str] | None = None


def _stop() -> frozenset[str]:
    global _stopwords
    if _stopwords is None:
        from bm25s.stopwords import STOPWORDS_EN

        _stopwords = frozenset(STOPWORDS_EN)
    return _stopwords


def tokenize(text: str) -> list[str]:
    """Search terms of `text` (see the module docstring)."""
    out = []
    stop = _stop()
    for m in _WORD.finditer(text.lower()):
        w = m.group()
        if _CJK.match(w):
            import jieba

            jieba.setLogLevel(logging.WARNING)
            out.extend(t for t in jieba.cut_for_search(w) if t.strip())
        elif len(w) > 1 and w not in stop:
            out.append(w)
    return out


class BM25:
    """BM25 over chunk ids; `search(query, k, allowed_ids)` -> [(chunk_id, score)], best first."""

    def __init__(self, ids: np.ndarray, token_lists: list[list[str]]):
        import bm25s

        self.ids = np.asarray(ids, dtype=np.int64)
        self.retriever = bm25s.BM25()
        if len(token_lists):
            self.retriever.index([t or [""] for t in token_lists], show_progress=False)

    def save(self, folder) -> None:
        self.retriever.save(folder, show_progress=False)
        np.save(f"{folder}/chunk_ids.npy", self.ids)

    @classmethod
    def load(cls, folder) -> BM25:
        import bm25s

        self = cls.__new__(cls)
        self.retriever = bm25s.BM25.load(folder, mmap=True, show_progress=False, verbosity=0)
        self.ids = np.load(f"{folder}/chunk_ids.npy")
        return self

    def search(self, query: str, k: int, allowed_ids: np.ndarray | None = None) -> list[tuple[int, float]]:
        terms = [t for t in tokenize(query) if t in self.retriever.vocab_dict]
        if not terms or not len(self.ids):
            return []
        mask = None
        if allowed_ids is not None:
            mask = np.isin(self.ids, allowed_ids).astype(np.float32)
        k = min(k, len(self.ids))
        rows, scores = self.retriever.retrieve([terms], k=k, show_progress=False, weight_mask=mask)
        return [(int(self.ids[r]), float(s)) for r, s in zip(rows[0], scores[0]) if s > 0]
