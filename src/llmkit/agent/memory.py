"""Agent memory.

- Short-term (`ShortTermMemory`): the conversation itself, kept within a token budget by replacing the
  oldest turns with a summary the model writes.
- Long-term (`LongTermMemory`): facts written to and recalled from a small embedded vector store (a folder
  with `facts.jsonl` + `vectors.npy`, cosine similarity), embedded with an encoder folder through
  `model/embed.py`, or with hashed character n-grams when no encoder is given.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.errors import InputError
from llmkit.fsutil import atomic_path, atomic_write_text

SUMMARY_PREFIX = "[Summary of the earlier steps]"


class ShortTermMemory:
    """Keep a conversation within `budget` prompt tokens by summarising its oldest turns with the model.

    The system message(s) and the task (first user message) are always kept, and so are the last
    `keep_last` messages; a tool result is never separated from the assistant message that asked for it.
    """

    def __init__(self, budget: int, keep_last: int = 4, summary_tokens: int = 128):
        if budget <= 0 or keep_last < 1:
            raise InputError(f"short-term memory needs budget > 0 and keep_last >= 1, got {budget}, {keep_last}")
        self.budget, self.keep_last, self.summary_tokens = budget, keep_last, summary_tokens
        self.summaries = 0

    def fit(self, messages: list[dict[str, Any]], count_tokens: Callable[[list[dict[str, Any]]], int],
            summarize: Callable[[str, int], str]) -> list[dict[str, Any]]:
        """`messages`, or a shorter list whose middle is one summary message, when they exceed the budget."""
        if count_tokens(messages) <= self.budget:
            return messages
        head = 0
        while head < len(messages) and messages[head]["role"] == "system":
            head += 1
        head += 1  # the task
        cut = len(messages) - self.keep_last
        while cut > head and messages[cut]["role"] == "tool":  # keep a tool call and its results together
            cut -= 1
        if cut <= head:
            return messages  # nothing old enough to summarise
        old = messages[head:cut]
        summary = summarize(transcript(old), self.summary_tokens).strip()
        self.summaries += 1
        note = {"role": "user", "content": f"{SUMMARY_PREFIX} {summary}"}
        return messages[:head] + [note] + messages[cut:]


def transcript(messages: list[dict[str, Any]]) -> str:
    """Messages as plain text (role: content, tool calls as name(arguments))."""
    lines = []
    for m in messages:
        text = m.get("content") or ""
        for c in m.get("tool_calls") or []:
            f = c.get("function", c)
            text += f" {f['name']}({f['arguments'] if isinstance(f['arguments'], str) else json.dumps(f['arguments'])})"
        lines.append(f"{m['role']}: {text.strip()}")
    return "\n".join(lines)


def hashed_ngrams(texts: list[str], dim: int = 512, n: int = 3) -> np.ndarray:
    """Unit vectors of hashed, lower-cased character n-grams and words: a model-free embedding [N, dim]."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, t in enumerate(texts):
        t = " " + re.sub(r"\s+", " ", t.lower()).strip() + " "
        grams = [t[j:j + n] for j in range(max(1, len(t) - n + 1))] + t.split()
        for g in grams:
            h = int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
            out[i, h % dim] += 1.0 if (h >> 63) & 1 == 0 else -1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-9)


class LongTermMemory:
    """Facts in a folder (`facts.jsonl`, `vectors.npy`), recalled by cosine similarity.

    `embed` is an encoder folder (embedded with `llmkit.embed`), a function `texts -> [N, dim]`, or None
    (hashed character n-grams).
    """

    def __init__(self, path: str | Path, embed: str | Callable[[list[str]], Any] | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        if isinstance(embed, str | Path):
            from llmkit.model.embed import embed as embed_texts

            folder = str(embed)
            self.embed_name = folder
            self._embed = lambda texts: np.asarray(embed_texts(folder, texts), np.float32)
        else:
            self.embed_name = getattr(embed, "__name__", "custom") if embed else "hashed-ngrams"
            self._embed = embed or hashed_ngrams
        self.lock = threading.Lock()
        self.facts: list[str] = []
        self.vectors = np.zeros((0, 0), np.float32)
        facts, vecs = self.path / "facts.jsonl", self.path / "vectors.npy"
        if facts.exists():
            meta = json.loads((self.path / "memory.json").read_text()) if (self.path / "memory.json").exists() else {}
            if meta.get("embed", self.embed_name) != self.embed_name:
                raise InputError(f"memory {self.path} was embedded with {meta['embed']!r}, not {self.embed_name!r}; "
                                 "use the same embedder or a new folder")
            self.facts = [json.loads(line)["fact"] for line in facts.read_text().splitlines() if line.strip()]
            self.vectors = np.load(vecs) if vecs.exists() else self._vectors(self.facts)
            if len(self.vectors) != len(self.facts):
                raise InputError(f"memory {self.path} is inconsistent ({len(self.facts)} facts, "
                                 f"{len(self.vectors)} vectors); delete the folder to start again")

    def _vectors(self, texts: list[str]) -> np.ndarray:
        v = np.asarray(self._embed(texts), np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)

    def __len__(self) -> int:
        return len(self.facts)

    def add(self, fact: str) -> None:
        """Store one fact (an exact repeat is stored once) and save the folder."""
        fact = fact.strip()
        if not fact:
            raise InputError("a fact to remember must be non-empty text")
        with self.lock:
            if fact in self.facts:
                return
            v = self._vectors([fact])
            self.vectors = v if len(self.facts) == 0 else np.concatenate([self.vectors, v])
            self.facts.append(fact)
            atomic_write_text(self.path / "facts.jsonl", "".join(json.dumps({"fact": f}) + "\n" for f in self.facts))
            with atomic_path(self.path / "vectors.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, self.vectors)
            atomic_write_text(self.path / "memory.json", json.dumps({"embed": self.embed_name}))

    def search(self, query: str, k: int = 3) -> list[tuple[str, float]]:
        """The `k` facts most similar to `query`, best first, with their cosine similarity."""
        if not self.facts or k <= 0:
            return []
        scores = self.vectors @ self._vectors([query])[0]
        order = np.argsort(-scores)[:k]
        return [(self.facts[i], float(scores[i])) for i in order]
