"""Duplicate removal: exact (hash of the normalised text) and near (MinHash LSH, Broder 1997).

Shingles are character n-grams, so near-dedup works for any script, Chinese included. Signatures
are computed here with numpy (vectorised over shingles); datasketch's MinHashLSH does the banding.
"""

from __future__ import annotations

import functools
import hashlib
import re

import numpy as np

_WS = re.compile(r"\s+")


def dedup_key(text: str) -> str:
    """The text duplicates are judged on: case-folded, whitespace runs collapsed."""
    return _WS.sub(" ", text.casefold()).strip()


def exact_hash(text: str) -> str:
    """A hex digest identifying `text` up to case and whitespace."""
    return hashlib.blake2b(dedup_key(text).encode("utf-8"), digest_size=16).hexdigest()


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each uint64 (SplitMix64's finaliser; array ops wrap modulo 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(text: str, shingle_size: int = 5) -> np.ndarray:
    """Distinct 64-bit hashes of the character `shingle_size`-grams of `dedup_key(text)`."""
    cp = np.frombuffer(dedup_key(text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(cp) == 0:
        return np.zeros(1, dtype=np.uint64)
    k = min(shingle_size, len(cp))
    n = len(cp) - k + 1
    h = cp[:n].copy()
    for j in range(1, k):  # polynomial hash of the k code points, then mixed
        h = h * np.uint64(0x100000001B3) + cp[j : j + n]
    return np.unique(_splitmix64(h))


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a[:, None], b[:, None]


def minhash_signature(text: str, num_perm: int = 128, shingle_size: int = 5, seed: int = 1) -> np.ndarray:
    """MinHash signature [num_perm] (uint32) of the set of character shingles of `text`.

    Permutation i is the multiply-shift hash h_i(x) = ((a_i * x + b_i) mod 2**64) >> 32
    (Dietzfelbinger et al. 1997); the signature holds min_x h_i(x) over the shingles x.
    Two signatures agree in a position with probability = the Jaccard similarity of the sets.
    """
    x = shingle_hashes(text, shingle_size)
    a, b = _permutations(num_perm, seed)
    sig = np.full(num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    for i in range(0, len(x), 1 << 14):  # blocks of shingles bound the [num_perm, block] temporary
        sig = np.minimum(sig, ((a * x[None, i : i + (1 << 14)] + b) >> np.uint64(32)).min(axis=1))
    return sig.astype(np.uint32)


class NearDuplicateIndex:
    """An LSH index of the documents kept so far; `add` says whether a new one nearly duplicates them."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128):
        from datasketch import LeanMinHash, MinHash, MinHashLSH  # imported here: it pulls in scipy

        self._lean_cls = LeanMinHash
        self.threshold = threshold
        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._scheme = getattr(MinHash(num_perm=num_perm), "scheme", None)
        self._signatures: list[np.ndarray] = []

    def _lean(self, sig: np.ndarray):
        if self._scheme is None:  # datasketch < 2.0
            return self._lean_cls(seed=1, hashvalues=sig)
        return self._lean_cls(seed=1, hashvalues=sig, scheme=self._scheme)

    def add(self, sig: np.ndarray) -> tuple[int, float] | None:
        """Insert `sig` unless it nearly duplicates a kept document; then return (that doc's index, Jaccard est.)."""
        m = self._lean(sig)
        best: tuple[int, float] | None = None
        for key in self.lsh.query(m):
            jaccard = float(np.mean(self._signatures[key] == sig))
            if jaccard >= self.threshold and (best is None or jaccard > best[1]):
                best = (key, jaccard)
        if best is not None:
            return best
        key = len(self._signatures)
        self._signatures.append(sig.astype(np.uint32, copy=False))
        self.lsh.insert(key, m)
        return None


class Deduplicator:
    """Exact + near duplicate filter over a document stream; remembers which kept document each matches."""

    def __init__(self, near_dup_threshold: float | None = 0.8, num_perm: int = 128):
        self._exact: dict[str, str] = {}  # exact hash -> source of the kept copy
        self._near = NearDuplicateIndex(near_dup_threshold, num_perm) if near_dup_threshold else None
        self._near_sources: list[str] = []  # index key -> source

    def check(self, source: str, digest: str, sig: np.ndarray | None) -> tuple[str | None, dict[str, str]]:
        """(None, {}) and remember the document if it is new, else (reason, {'duplicate_of', ...})."""
        if digest in self._exact:
            return "exact_duplicate", {"duplicate_of": self._exact[digest]}
        if self._near is not None:
            hit = self._near.add(sig)
            if hit is not None:
                return "near_duplicate", {"duplicate_of": self._near_sources[hit[0]], "jaccard": f"{hit[1]:.3f}"}
            self._near_sources.append(source)
        self._exact[digest] = source
        return None, {}
