"""Token data for pretraining: open a prepared shard folder, or prepare raw text on the fly.

A prepared folder is what `llmkit data prepare` writes (train.bin, val.bin, manifest.json,
tokenizer/). Raw text (a file, a folder, JSONL) is first given a tokenizer (a character one, a
BPE trained on it, or an existing tokenizer folder), then run through the same `prepare`
(cleaning, dedup, packing) into `out_dir/data`, with nanoGPT's split: the last `val_fraction`
of the token stream is the validation split.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmkit.data.prepare import prepare
from llmkit.data.shards import load_tokens, read_manifest
from llmkit.errors import ConfigError, InputError
from llmkit.text.sources import expand_inputs, iter_documents
from llmkit.tokenizer import load_tokenizer, train_bpe_from_iterator, train_char_from_iterator

FINGERPRINT = "source.json"  # beside the prepared data: what it was prepared from


@dataclass
class TokenData:
    """The two splits as memory-mapped token arrays, plus the tokenizer folder."""

    train: np.ndarray
    val: np.ndarray
    tokenizer_dir: Path
    data_dir: Path


def open_token_data(data_dir: str | Path) -> TokenData:
    """Open a prepared folder without reading it into memory."""
    d = Path(data_dir)
    manifest = read_manifest(d)
    train, val = load_tokens(d, "train"), load_tokens(d, "val")
    if len(train) == 0:
        raise InputError(f"{str(d)!r} holds no training tokens; expected a non-empty train.bin")
    if len(val) == 0:
        val = train  # data prepared with val_fraction 0: evaluate on the training text
    tok = manifest.get("tokenizer", {})
    tok_dir = d / tok.get("copy", "tokenizer") if isinstance(tok, dict) else d / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise InputError(
            f"{str(d)!r} has no tokenizer copy ({tok_dir} is missing tokenizer.json); "
            "prepare it again with `llmkit data prepare`"
        )
    return TokenData(train, val, tok_dir, d)


def _fingerprint(files: list[Path], tokenizer: str, vocab_size: int, val_fraction: float) -> dict:
    return {
        "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "tokenizer": tokenizer,
        "vocab_size": vocab_size if tokenizer == "bpe" else None,
        "val_fraction": val_fraction,
    }


def _texts(files: list[Path]):

    for doc in iter_documents(files):
        yield doc.text


def build_tokenizer(files: list[Path], spec: str, vocab_size: int, out: Path, progress: bool = True):
    """`char`: one token per character seen; `bpe`: byte-level BPE of `vocab_size`; else a folder."""
    if spec == "char":
        return train_char_from_iterator(_texts(files), out)
    if spec == "bpe":
        return train_bpe_from_iterator(_texts(files), vocab_size, out, show_progress=progress)
    if Path(spec).is_dir() or Path(spec).is_file():
        tok = load_tokenizer(spec)
        tok.save(out)
        return tok
    raise ConfigError(f"data.tokenizer={spec!r}: expected 'char', 'bpe' or a tokenizer folder that exists")


def prepare_text(
    path: str | Path | list,
    out_dir: str | Path,
    tokenizer: str = "char",
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    progress: bool = True,
) -> TokenData:
    """Tokenize raw text into `out_dir` (reused when prepared from the same files and settings)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    files = expand_inputs(path)
    if not files:
        raise InputError(f"no text files found at {path!r}; expected a text file, JSONL or a folder of them")
    out = Path(out_dir)
    fp = _fingerprint(files, tokenizer, vocab_size, val_fraction)
    fp_file = out.with_name(out.name + "." + FINGERPRINT)
    if (out / "manifest.json").is_file() and fp_file.is_file():
        try:
            if json.loads(fp_file.read_text()) == fp:
                return open_token_data(out)
        except json.JSONDecodeError:
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    tok_dir = out.with_name(out.name + ".tokenizer")
    build_tokenizer(files, tokenizer, vocab_size, tok_dir, progress)
    big = sum(f.stat().st_size for f in files) > 32 << 20
    prepare(
        files,
        tok_dir,
        out,
        val_fraction=val_fraction,
        split="tail",
        progress=progress,
        workers=max(1, min(8, os.cpu_count() or 1)) if big else 1,
    )
    fp_file.write_text(json.dumps(fp))
    return open_token_data(out)


def resolve_data(
    path: str | Path | None,
    out_dir: str | Path,
    tokenizer: str,
    vocab_size: int,
    val_fraction: float,
    progress: bool = True,
) -> TokenData:
    """A prepared folder is opened as is; raw text is prepared into `out_dir/data`."""
    if path is None:
        raise ConfigError(
            "no training data: pass --data PATH (text file, folder, or prepared folder) or set data.path in the config"
        )
    p = Path(path)
    if p.is_dir() and (p / "manifest.json").is_file():
        return open_token_data(p)
    if not p.exists():
        raise InputError(
            f"data path {str(p)!r} does not exist; expected a text file, a folder of text "
            "files, or a folder prepared by `llmkit data prepare`"
        )
    return prepare_text(p, Path(out_dir) / "data", tokenizer, vocab_size, val_fraction, progress)
