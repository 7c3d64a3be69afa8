"""llmkit.train: pretraining (config, loop, schedule, checkpoints, DDP/FSDP) and the quickstart job
(`llmkit.train.quickstart.quickstart`)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "llmkit.train.config",
    "pretrain": "llmkit.train.trainer",
    "Trainer": "llmkit.train.trainer",
    "TrainResult": "llmkit.train.trainer",
    "cosine_lr": "llmkit.train.schedule",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmkit.train' has no attribute {name!r}")
