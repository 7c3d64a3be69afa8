"""Layers shared by every model family: norms, activations, the token-id check."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import InputError
from llmkit.model.config import ModelConfig

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = x.dtype == torch.float32 and self.weight.dtype == torch.float32
        if fused and not torch.onnx.is_in_onnx_export():  # one fused kernel (ONNX has no rms_norm before opset 23)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The config's pre-norm: RMSNorm, or LayerNorm (with or without bias)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, cfg.norm_eps, bias=cfg.norm_bias)


def check_token_ids(input_ids: torch.Tensor | list[int], vocab_size: int, what: str = "token ids") -> None:
    """Raise InputError unless every id is an int in [0, vocab_size) (before any embedding lookup sees it).

    The one token-id range check: model forwards (tensors) and generation entry points (lists).
    """
    if isinstance(input_ids, torch.Tensor):
        if input_ids.numel():
            lo, hi = torch.aminmax(input_ids)
            if int(lo) < 0 or int(hi) >= vocab_size:
                raise InputError(f"{what} must be in [0, {vocab_size}), got min {int(lo)}, max {int(hi)}")
        return
    bad = [t for t in input_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InputError(f"{what} {bad[:5]} out of range: outside [0, {vocab_size}), expected ints")
