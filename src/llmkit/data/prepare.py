"""`prepare`: raw text -> cleaned, deduplicated, tokenized, packed train/val token shards.

Documents stream through in chunks: workers clean, sign (MinHash) and tokenize a chunk; the main
process keeps the dedup indexes, assigns the split and appends tokens to the shard files. Output:

    out/train.bin, out/val.bin    flat token ids (numpy memmap, uint16 if the vocab fits, else uint32),
                                  documents in input order, each followed by EOS
    out/manifest.json             tokenizer, dtype, counts per split, cleaning + dedup report, sources
    out/report.json               the dedup / cleaning report alone
    out/tokenizer/                a copy of the tokenizer, so the folder is self-contained

The whole folder is built beside `out` and swapped in at the end, so a crash never leaves half a dataset.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llmkit.errors import InputError
from llmkit.fsutil import replace_dir, sha256_file
from llmkit.text.clean import NORMALIZATIONS, clean_text
from llmkit.text.dedup import Deduplicator, exact_hash, minhash_signature
from llmkit.text.sources import DOC_BOUNDARIES, Document, expand_inputs, iter_documents
from llmkit.tokenizer import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
REASONS = ("empty", "too_short", "exact_duplicate", "near_duplicate")
N_EXAMPLES = 3
FLUSH_TOKENS = 1 << 20  # tokens buffered per split before a write


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _split_of(digest: str, seed: int, val_fraction: float) -> str:
    """Deterministic document-level split from the document's content hash and the seed."""
    h = hashlib.blake2b(f"{seed}:{digest}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(h, "little") / 2**64 < val_fraction else "train"


# ---- worker side -----------------------------------------------------------------------------------
_W: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, opts: dict[str, Any], single_thread: bool = False) -> None:
    if single_thread:  # one process per core already; keep the Rust thread pool to one thread
        os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = "1"
    _W["tok"] = load_tokenizer(tokenizer_dir)
    _W["opts"] = opts


def _process_chunk(docs: list[Document]) -> list[tuple[Any, ...]]:
    """Clean, hash, sign and tokenize a chunk: [(source, reason or None, text, exact hash, sig, ids)]."""
    tok: Tokenizer = _W["tok"]
    o = _W["opts"]
    out = []
    kept_texts, kept_rows = [], []
    for d in docs:
        text = clean_text(d.text, o["normalization"], o["normalize_whitespace"])
        if not text.strip():
            out.append([d.source, "empty", d.text, None, None, None])
        elif len(text) < o["min_chars"]:
            out.append([d.source, "too_short", text, None, None, None])
        else:
            sig = minhash_signature(text, o["num_perm"], o["shingle_size"]) if o["near_dup"] else None
            out.append([d.source, None, text, exact_hash(text), sig, None])
            kept_texts.append(text)
            kept_rows.append(out[-1])
    if kept_texts:
        for row, ids in zip(kept_rows, tok.encode_batch(kept_texts, add_special_tokens=False)):
            row[5] = np.asarray(ids, dtype=o["dtype"])
    return [tuple(r) for r in out]


# ---- main side -------------------------------------------------------------------------------------
def _chunks(docs: Iterator[Document], max_docs: int, max_chars: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    size = 0
    for d in docs:
        chunk.append(d)
        size += len(d.text)
        if len(chunk) >= max_docs or size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _ShardWriter:
    """Appends documents (+ EOS) to train.bin / val.bin through a buffer; counts tokens and documents."""

    def __init__(self, folder: Path, eos: int, dtype: np.dtype):
        self.eos, self.dtype = eos, dtype
        self.files = {s: open(folder / f"{s}.bin", "wb") for s in SPLITS}
        self.buffers: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.buffered = dict.fromkeys(SPLITS, 0)
        self.counts = {s: {"tokens": 0, "documents": 0} for s in SPLITS}

    def append(self, split: str, ids: np.ndarray) -> None:
        self.buffers[split].append(ids)
        self.buffered[split] += len(ids) + 1
        self.counts[split]["tokens"] += len(ids) + 1
        self.counts[split]["documents"] += 1
        if self.buffered[split] >= FLUSH_TOKENS:
            self._flush(split)

    def _flush(self, split: str) -> None:
        docs = self.buffers[split]
        if docs:
            ends = np.cumsum([len(d) + 1 for d in docs])
            arr = np.empty(ends[-1], dtype=self.dtype)  # [doc0 EOS doc1 EOS ...]
            arr[ends - 1] = self.eos
            for d, end in zip(docs, ends):
                arr[end - 1 - len(d) : end - 1] = d
            arr.tofile(self.files[split])
        self.buffers[split], self.buffered[split] = [], 0

    def close(self) -> None:
        for split, f in self.files.items():
            self._flush(split)
            f.close()


class _Report:
    """Counts of removed documents per reason, with a few examples of each."""

    def __init__(self):
        self.input_documents = 0
        self.removed = dict.fromkeys(REASONS, 0)
        self.examples: dict[str, list[dict[str, str]]] = {r: [] for r in REASONS}

    def remove(self, reason: str, source: str, text: str, info: dict[str, str]) -> None:
        self.removed[reason] += 1
        if len(self.examples[reason]) < N_EXAMPLES:
            self.examples[reason].append({"source": source, "text": _snippet(text), **info})

    def to_dict(self, kept: int) -> dict[str, Any]:
        examples = {r: e for r, e in self.examples.items() if e}
        return {
            "input_documents": self.input_documents,
            "kept_documents": kept,
            "removed": self.removed,
            "examples": examples,
        }




def _snippet(text: str, n: int = 80) -> str:
    return text[:n] + ("…" if len(text) > n else "")


def _tail_split(stage: Path, dtype: np.dtype, val_fraction: float, counts: dict[str, dict[str, int]]) -> None:
    """Move the last `val_fraction` of the token stream into val.bin (nanoGPT-style split)."""
    if counts["train"]["tokens"] == 0:  # everything landed in val: that file is the stream
        os.replace(stage / "val.bin", stage / "train.bin")
        counts["train"], counts["val"] = counts["val"], {"tokens": 0, "documents": 0}
    n = counts["train"]["tokens"]
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    if n_val < 1:
        raise InputError(f"the corpus has only {n} token(s); too few to split into train and val")
    stream = np.memmap(stage / "train.bin", dtype=dtype, mode="r")
    with open(stage / "val.bin", "wb") as f:
        step = 1 << 22
        for i in range(n - n_val, n, step):
            np.asarray(stream[i : min(i + step, n)]).tofile(f)
    del stream
    os.truncate(stage / "train.bin", (n - n_val) * dtype.itemsize)
    counts["train"]["tokens"], counts["val"]["tokens"] = n - n_val, n_val
    counts["val"]["documents"] = 0  # the val tail is part of the last document(s)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise InputError(
            f"{out} exists and is not an llmkit data folder (no {MANIFEST}); "
            f"refusing to overwrite it, choose another --out"
        )


def _swap_in(stage: Path, out: Path) -> None:
    """Replace `out` by the finished `stage` folder (the old one is removed only after the swap)."""
    if out.exists():
        _check_out(out)
    replace_dir(stage, out)


def prepare(
    inputs: list[str | os.PathLike] | str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer,
    out: str | os.PathLike,
    val_fraction: float = 0.005,
    min_chars: int = 1,
    near_dup_threshold: float | None = 0.8,
    text_field: str = "text",
    workers: int = 1,
    normalization: str = "NFC",
    normalize_whitespace: bool = True,
    doc_boundary: str = "file",
    split: str = "doc",
    seed: int = 0,
    num_perm: int = 128,
    shingle_size: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Clean, deduplicate, tokenize and pack `inputs` into token shards in folder `out`; return the manifest.

    `split='doc'` assigns whole documents to val by a seeded hash (falls back to `tail` when that leaves
    a split empty, e.g. for a single-file corpus); `split='tail'` puts the last `val_fraction` of the
    token stream into val, as nanoGPT does. `near_dup_threshold=None` (or 0) turns near-dedup off.
    `normalization='none', normalize_whitespace=False` keeps the text byte for byte (minus control characters).
    `workers > 1` starts processes with `spawn`: call it under `if __name__ == "__main__":` in scripts.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if near_dup_threshold is not None and not 0.0 <= near_dup_threshold <= 1.0:
        raise InputError(f"near_dup_threshold must be in (0, 1] (or 0/None to disable), got {near_dup_threshold}")
    if split not in ("doc", "tail"):
        raise InputError(f"split must be 'doc' or 'tail', got {split!r}")
    if normalization not in NORMALIZATIONS:
        raise InputError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if doc_boundary not in DOC_BOUNDARIES:
        raise InputError(f"doc_boundary must be one of {DOC_BOUNDARIES}, got {doc_boundary!r}")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    files = expand_inputs(inputs)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    eos = tok.eos_token_id
    if eos is None:
        raise InputError(
            f"tokenizer {tok} has no eos_token; documents are separated by EOS, so set "
            f"eos_token in its tokenizer_config.json"
        )
    dtype = token_dtype(tok.vocab_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    near = bool(near_dup_threshold)
    opts = dict(
        normalization=normalization,
        normalize_whitespace=normalize_whitespace,
        min_chars=min_chars,
        near_dup=near,
        num_perm=num_perm,
        shingle_size=shingle_size,
        dtype=dtype.name,
    )

    _check_out(out)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        t0 = time.time()
        tok.save(stage / "tokenizer")  # workers load this copy; it also travels with the data
        tok_dir = str(stage / "tokenizer")
        chunks = _chunks(iter_documents(files, text_field, doc_boundary), max_docs=256, max_chars=1 << 21)
        pool = None
        if workers > 1:
            pool = mp.get_context("spawn").Pool(workers, _init_worker, (tok_dir, opts, True))
            results = pool.imap(_process_chunk, chunks)
        else:
            _init_worker(tok_dir, opts)
            results = map(_process_chunk, chunks)
        dedup = Deduplicator(near_dup_threshold if near else None, num_perm)
        rep = _Report()
        writer = _ShardWriter(stage, eos, dtype)
        bar = tqdm(desc="prepare", unit="doc", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        try:
            for source, reason, text, digest, sig, ids in itertools.chain.from_iterable(results):
                rep.input_documents += 1
                bar.update(1)
                info: dict[str, str] = {}
                if reason is None:
                    reason, info = dedup.check(source, digest, sig)
                if reason is not None:
                    rep.remove(reason, source, text, info)
                    continue
                writer.append("train" if split == "tail" else _split_of(digest, seed, val_fraction), ids)
                bar.set_postfix(tokens=sum(c["tokens"] for c in writer.counts.values()), refresh=False)
        finally:
            bar.close()
            writer.close()
            if pool is not None:
                pool.terminate()
        counts = writer.counts
        kept = counts["train"]["documents"] + counts["val"]["documents"]
        if kept == 0:
            n = rep.input_documents
            what = "no documents" if n == 0 else f"all {n} documents were removed ({rep.removed})"
            raise InputError(
                f"the corpus is empty after cleaning and dedup: {what}; give inputs with text "
                f"(and check --min-chars / --text-field)"
            )
        split_used = split
        if val_fraction > 0 and (split == "tail" or 0 in (counts["train"]["tokens"], counts["val"]["tokens"])):
            _tail_split(stage, dtype, val_fraction, counts)
            split_used = "tail"

        report = rep.to_dict(kept)
        tok_path = None if isinstance(tokenizer, Tokenizer) else str(Path(tokenizer).resolve())
        manifest = {
            "format": "llmkit-token-shards",
            "version": 1,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eos_token_id": eos,
            "tokenizer": {
                "path": tok_path,
                "sha256": sha256_file(stage / "tokenizer" / "tokenizer.json"),
                "copy": "tokenizer",
            },
            "splits": {s: {"file": f"{s}.bin", **counts[s]} for s in SPLITS},
            "split": {"mode": split_used, "val_fraction": val_fraction, "seed": seed},
            "cleaning": {
                "normalization": normalization,
                "normalize_whitespace": normalize_whitespace,
                "min_chars": min_chars,
                "doc_boundary": doc_boundary,
                "text_field": text_field,
            },
            "dedup": {
                "exact": True,
                "near_dup_threshold": near_dup_threshold if near else None,
                "num_perm": num_perm,
                "shingle_size": shingle_size,
                "report": report,
            },
            "sources": [str(f) for f in files],
            "seconds": round(time.time() - t0, 3),
        }
        (stage / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _swap_in(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def format_report(manifest: dict[str, Any]) -> str:
    """A short human-readable summary of a prepare run."""
    rep = manifest["dedup"]["report"]
    sp = manifest["splits"]
    lines = [
        f"documents: {rep['input_documents']} read, {rep['kept_documents']} kept",
        "removed: " + ", ".join(f"{k}={v}" for k, v in rep["removed"].items()),
    ]
    for reason, exs in rep["examples"].items():
        for e in exs:
            extra = f" (duplicate of {e['duplicate_of']})" if "duplicate_of" in e else ""
            lines.append(f"  {reason}: {e['source']}{extra}: {e['text']!r}")
    lines.append(
        f"tokens: train={sp['train']['tokens']:,} val={sp['val']['tokens']:,} "
        f"({manifest['dtype']}, vocab {manifest['vocab_size']}, split {manifest['split']['mode']})"
    )
    return "\n".join(lines)
