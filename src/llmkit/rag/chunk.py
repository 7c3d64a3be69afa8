"""Structure-aware recursive chunking, sized in tokens of the embedding tokenizer.

A document part is split at Markdown headings into sections (each keeps its heading trail, e.g.
["Install", "From source"]); a section's body is split recursively at paragraphs, then lines, then
sentences (`. ! ?` and Chinese `。！？`), then words, then characters, until every piece fits; pieces
are packed greedily into chunks of at most `chunk_size` tokens (the heading trail included), and each
chunk starts with up to `chunk_overlap` tokens from the end of the previous one (whole pieces when
they fit, else the last words).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from llmkit.errors import InputError
from llmkit.rag.loaders import Document

HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
# separators from coarse to fine; sentence ends keep their punctuation with the sentence before
SEPARATORS = [
    re.compile(r"\n\s*\n"),
    re.compile(r"\n"),
    re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])"),
    re.compile(r"\s+"),
]


@dataclass
class Chunk:
    text: str
    source: str
    ord: int  # position in the document
    page: int | None = None
    headings: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    n_tokens: int = 0

    def embed_text(self) -> str:
        """What is embedded and keyword-indexed: the heading trail, then the text."""
        return " > ".join(self.headings) + "\n" + self.text if self.headings else self.text


def split_sections(text: str) -> list[tuple[list[str], str]]:
    """[(heading trail, body)] at Markdown headings; text before the first heading has an empty trail."""
    out, trail, start = [], [], 0
    in_fence = _fence_spans(text)
    for m in HEADING.finditer(text):
        if any(a <= m.start() < b for a, b in in_fence):
            continue  # a `# comment` inside a code block is not a heading
        out.append((list(trail), text[start : m.start()]))
        level = len(m.group(1))
        trail = trail[: level - 1] + [""] * max(0, level - 1 - len(trail)) + [m.group(2).strip()]
        start = m.end()
    out.append((list(trail), text[start:]))
    return [([h for h in t if h], body.strip()) for t, body in out if body.strip()]


def _fence_spans(text: str) -> list[tuple[int, int]]:
    marks = [m.start() for m in re.finditer(r"^```", text, re.M)]
    return list(zip(marks[::2], marks[1::2] + [len(text)]))


def split_recursive(text: str, count: Callable[[str], int], size: int, level: int = 0) -> list[str]:
    """Pieces of `text`, each of at most `size` tokens, cut at the coarsest separator that works."""
    text = text.strip()
    if not text:
        return []
    if count(text) <= size:
        return [text]
    if level == len(SEPARATORS):  # one very long "word": cut by characters
        n = max(1, len(text) * size // count(text))
        return [p for i in range(0, len(text), n) for p in split_recursive(text[i : i + n], count, size, level)]
    out = []
    for piece in SEPARATORS[level].split(text):
        out.extend(split_recursive(piece, count, size, level + 1))
    return out


def pack(pieces: list[str], count: Callable[[str], int], size: int, overlap: int) -> list[tuple[str, int]]:
    """Greedy packing of pieces into (text, tokens) chunks of at most `size` tokens with `overlap`."""
    chunks, cur, cur_n = [], [], 0
    lens = [count(p) for p in pieces]
    for piece, n in zip(pieces, lens):
        if cur and cur_n + n > size:
            chunks.append((_join(cur), cur_n))
            keep, kept = [], 0  # whole pieces from the end, up to `overlap` tokens
            for p, pn in reversed(cur):
                if kept + pn > overlap or kept + pn + n > size:
                    break
                keep.insert(0, (p, pn))
                kept += pn
            if not keep and overlap:  # the last piece is longer than the overlap: take its last words
                words = cur[-1][0].split(" ")
                for j in range(len(words) - 1, 0, -1):
                    tail = " ".join(words[j:])
                    if count(tail) > overlap or count(tail) + n > size:
                        break
                    keep, kept = [(tail, count(tail))], count(tail)
            cur, cur_n = keep, kept
        cur.append((piece, n))
        cur_n += n
    if cur:
        chunks.append((_join(cur), cur_n))
    return chunks


def _join(pieces: list[tuple[str, int]]) -> str:
    sep = " " if all("\n" not in p for p, _ in pieces) else "\n"
    return sep.join(p for p, _ in pieces)


def chunk_document(doc: Document, count: Callable[[str], int], chunk_size: int = 200,
                   chunk_overlap: int = 20) -> list[Chunk]:
    """Chunks of `doc`; `count(text)` is the number of embedding-tokenizer tokens in `text`."""
    if chunk_size < 16:
        raise InputError(f"chunk_size {chunk_size} is too small; expected at least 16 tokens")
    if not 0 <= chunk_overlap < chunk_size // 2:
        raise InputError(f"chunk_overlap {chunk_overlap} must be in [0, chunk_size / 2) = [0, {chunk_size // 2})")
    out: list[Chunk] = []
    for part in doc.parts:
        for trail, body in split_sections(part.text):
            budget = max(chunk_size // 2, chunk_size - (count(" > ".join(trail)) + 1 if trail else 0))
            pieces = split_recursive(body, count, budget)
            for text, n in pack(pieces, count, budget, min(chunk_overlap, budget // 2 - 1)):
                out.append(Chunk(text, doc.source, len(out), part.page, trail, dict(part.meta), n))
    return out


def token_counter(count_tokens: Callable[[str], int]) -> Callable[[str], int]:
    """`count_tokens` memoised (the same pieces are counted again while packing)."""
    cache: dict[str, int] = {}

    def count(text: str) -> int:
        n = cache.get(text)
        if n is None:
            n = cache[text] = count_tokens(text)
            if len(cache) > 100_000:
                cache.clear()
        return n

    return count
