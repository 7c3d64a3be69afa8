"""Calibration samples for GPTQ / AWQ / SmoothQuant: N windows of token ids from text or prepared shards."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from llmkit.data.shards import load_tokens
from llmkit.errors import InputError


def load_calibration(
    source: str | os.PathLike,
    tokenizer=None,
    n_samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """Token ids [n, seq_len]: evenly spaced windows of a text file (tokenized with `tokenizer`) or of a
    prepared data folder's train split (`llmkit data prepare` output, manifest.json)."""
    path = Path(source)
    if path.is_dir():
        tokens = np.asarray(load_tokens(path, "train"), dtype=np.int64)
    elif path.is_file():
        if tokenizer is None:
            raise InputError("a text calibration file needs a tokenizer (the model folder's tokenizer.json)")
        text = path.read_text(encoding="utf-8", errors="replace")
        tokens = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    else:
        raise InputError(f"calibration source {path} does not exist; expected a text file or a prepared data folder")
    if n_samples < 1 or seq_len < 1:
        raise InputError(f"n_samples and seq_len must be >= 1, got {n_samples}, {seq_len}")
    if len(tokens) < seq_len + 1:
        raise InputError(f"calibration source {path} has {len(tokens)} tokens; need at least {seq_len + 1}")
    starts = np.linspace(0, len(tokens) - seq_len, n_samples).astype(np.int64)
    rng = np.random.default_rng(seed)
    jitter = rng.integers(0, max(1, (len(tokens) - seq_len) // (4 * n_samples)), n_samples)
    starts = np.minimum(starts + jitter, len(tokens) - seq_len)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts]))
