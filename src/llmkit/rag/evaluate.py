"""Retrieval metrics on labelled questions (qrels): recall@k, MRR and nDCG@10, judged per document.

A qrels file is JSONL, one question a line: `{"query": "...", "relevant": ["path/suffix.md", ...]}`.
A retrieved chunk is relevant when its source path ends with one of the `relevant` entries; the
ranked chunks are reduced to their documents (first occurrence) before scoring, so the metrics do
not depend on how the documents were chunked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from llmkit.errors import InputError
from llmkit.text.sources import read_jsonl_records


def load_qrels(path: str | os.PathLike) -> list[dict]:
    items = []
    expected = '{"query": "...", "relevant": ["doc path", ...]} per line'
    for rec, where in read_jsonl_records(path, "--qrels", expected):
        if not isinstance(rec.get("query"), str) or not rec.get("relevant"):
            raise InputError(f"{where}: expected {expected}")
        rel = rec["relevant"]
        items.append({"query": rec["query"], "relevant": [rel] if isinstance(rel, str) else list(rel)})
    if not items:
        raise InputError(f"--qrels {path}: no questions")
    return items


def _matches(source: str, rel: str) -> bool:
    s, r = source.replace(os.sep, "/"), rel.replace(os.sep, "/").lstrip("./")
    return s == r or s.endswith("/" + r)


def doc_ranking(sources: list[str], relevant: list[str]) -> list[int | None]:
    """For each distinct retrieved document (in rank order): the index of the relevant entry it is, or None."""
    seen, out = set(), []
    for s in sources:
        if s in seen:
            continue
        seen.add(s)
        out.append(next((i for i, r in enumerate(relevant) if _matches(s, r)), None))
    return out


def scores(ranking: list[int | None], n_relevant: int, k: int) -> dict:
    """recall@k, recall@1, MRR and nDCG@10 of one question's document ranking."""
    hits = [i is not None for i in ranking]
    first = next((r for r, h in enumerate(hits, 1) if h), None)
    dcg = sum(1 / math.log2(r + 1) for r, h in enumerate(hits[:10], 1) if h)
    idcg = sum(1 / math.log2(r + 1) for r in range(1, min(n_relevant, 10) + 1))
    return {f"recall@{k}": len({i for i in ranking[:k] if i is not None}) / n_relevant,
            "recall@1": len({i for i in ranking[:1] if i is not None}) / n_relevant,
            "mrr": 1 / first if first else 0.0, "ndcg@10": dcg / idcg}


def evaluate(search: Callable[[str], list], items: list[dict], k: int = 10) -> dict:
    """Mean metrics of `search(query) -> hits (with .source)` over the qrels `items`."""
    total: dict[str, float] = {}
    for it in items:
        ranking = doc_ranking([h.source for h in search(it["query"])], it["relevant"])
        for name, v in scores(ranking, len(it["relevant"]), k).items():
            total[name] = total.get(name, 0.0) + v
    return {name: round(v / len(items), 4) for name, v in total.items()} | {"questions": len(items)}
