"""Readers for the token shards `prepare` writes: a memmap per split, a random-window sampler
(nanoGPT's `get_batch`) and a deterministic, resumable sequential iterator."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.errors import InputError

MANIFEST = "manifest.json"


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest.json of a prepared data folder."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise InputError(
            f"{data_dir} is not a prepared data folder (no {MANIFEST}); "
            f"make one with `llmkit data prepare --input ... --tokenizer ... --out {data_dir}`"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is corrupt (line {e.lineno}): {e.msg}; run `llmkit data prepare` again") from None


def load_tokens(data_dir: str | os.PathLike, split: str = "train") -> np.memmap:
    """The token ids of `split` ('train' or 'val') as a read-only 1-D memmap [n_tokens]."""
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise InputError(f"unknown split {split!r}; this folder has {sorted(manifest['splits'])}")
    info = manifest["splits"][split]
    path = Path(data_dir) / info["file"]
    dtype = np.dtype(manifest["dtype"])
    if not path.is_file() or path.stat().st_size != info["tokens"] * dtype.itemsize:
        raise InputError(
            f"{path} is missing or truncated: manifest says {info['tokens']} {dtype.name} tokens; "
            f"run `llmkit data prepare` again"
        )
    if info["tokens"] == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


class TokenShards:
    """One split of a prepared data folder: `tokens` (memmap), `manifest`, `vocab_size`, `eos_token_id`."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = read_manifest(data_dir)
        self.tokens = load_tokens(data_dir, split)
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eos_token_id: int = self.manifest["eos_token_id"]
        self.tokenizer_dir = self.data_dir / self.manifest["tokenizer"]["copy"]

    def __len__(self) -> int:
        return len(self.tokens)

    def get_batch(self, batch_size: int, seq_len: int, generator=None, device=None):
        return get_batch(self.tokens, batch_size, seq_len, generator, device)

    def __repr__(self) -> str:
        return f"TokenShards({str(self.data_dir)!r}, {self.split!r}, tokens={len(self):,}, vocab={self.vocab_size})"


def _check_window(n_tokens: int, seq_len: int) -> None:
    if n_tokens < seq_len + 1:
        raise InputError(
            f"only {n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            f"use a smaller seq_len or more data"
        )


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, generator=None, device=None):
    """Random windows: inputs x [B, T] and next-token targets y [B, T] (int64 tensors).

    Offsets come from `torch.randint(..., generator=generator)`, so a seeded generator gives the same
    batches, and saving `generator.get_state()` makes the stream resumable.
    """
    import torch

    _check_window(len(tokens), seq_len)
    ix = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator).tolist()
    x, y = windows(tokens, ix, seq_len)
    if device is not None and str(device) != "cpu":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous(), y.contiguous()


def windows(tokens: np.ndarray, starts: list[int], seq_len: int):
    """Inputs tokens[i : i+T] and next-token targets tokens[i+1 : i+T+1] for each start i: x, y [B, T] int64.

    The one window gather (random batches here and in the trainer's sampler, evaluation windows).
    """
    import torch

    # one fancy-index into the memmap gathers the B windows of T+1 tokens
    idx = np.add.outer(np.asarray(starts, dtype=np.int64), np.arange(seq_len + 1))  # [B, T+1]
    rows = np.asarray(tokens[idx], dtype=np.int64)
    xy = torch.from_numpy(rows)  # [B, T+1]
    return xy[:, :-1], xy[:, 1:]


class SequentialBatches:
    """Consecutive, non-overlapping windows in order, wrapping around at the end (one pass = an epoch).

    Deterministic and resumable: `state_dict()` / `load_state_dict()` hold the position. With
    `rank`/`world_size` each process reads its own interleaved windows (for DDP).
    Yields (x [B, T], y [B, T]) int64 tensors.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        _check_window(len(tokens), seq_len)
        if not 0 <= rank < world_size:
            raise InputError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.n_windows = (len(tokens) - 1) // seq_len
        self.step = 0  # global batches consumed so far

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        B, T = self.batch_size, self.seq_len
        first = (self.step * self.world_size + self.rank) * B
        windows = (np.arange(first, first + B) % self.n_windows) * T  # start offsets [B]
        rows = np.asarray(self.tokens[np.add.outer(windows, np.arange(T + 1))], dtype=np.int64)
        self.step += 1
        xy = torch.from_numpy(rows)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    @property
    def epoch(self) -> float:
        return self.step * self.world_size * self.batch_size / self.n_windows

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
