"""Learning-rate schedule: linear warmup, then cosine decay to a floor (Loshchilov & Hutter, 2017)."""

from __future__ import annotations

import math


def cosine_lr(step: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """Learning rate at optimizer step `step` (0-based).

    Rises linearly over `warmup_iters` steps to `lr`, follows a half cosine down to `min_lr` at
    `decay_iters`, and stays at `min_lr` after that.
    """
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def cosine_lr_fraction(progress: float, step: int, lr: float, min_lr: float, warmup_iters: int) -> float:
    """Learning rate when the run length is a time budget: `progress` in [0, 1] is the budget used."""
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
