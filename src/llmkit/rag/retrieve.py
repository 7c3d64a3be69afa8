"""Rank fusion and diversity for hybrid retrieval."""

from __future__ import annotations

import numpy as np

RRF_K = 60  # Cormack et al. 2009


def rrf(rankings: list[list[tuple[int, float]]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: score(d) = sum over rankings of 1 / (k + rank(d)), rank from 1; best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, (doc, _) in enumerate(ranking, 1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda x: (-x[1], x[0]))


def mmr(query: np.ndarray, cands: np.ndarray, k: int, lam: float = 0.5) -> list[int]:
    """Maximal marginal relevance (Carbonell & Goldstein 1998): indices into `cands` [N, D], picked greedily."""
    rel = cands @ query
    chosen: list[int] = []
    while len(chosen) < min(k, len(cands)):
        red = (cands @ cands[chosen].T).max(1) if chosen else np.zeros(len(cands))
        score = lam * rel - (1 - lam) * red
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
    return chosen
