"""Layers shared by every model family: embeddings, norms, activations, the token-id check."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _nn_module

from llmkit.errors import InputError
from llmkit.model import kernels
from llmkit.model.config import ModelConfig

KERNEL_ELEMS = 8192  # RMSNorm inputs up to this size (a few rows) run llmkit's C kernel on the CPU

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


_GLOBAL_HOOKS = (_nn_module._global_forward_pre_hooks, _nn_module._global_forward_hooks,
                 _nn_module._global_backward_pre_hooks, _nn_module._global_backward_hooks)
_MODULE_CALL = nn.Module.__call__


def call(m: nn.Module, *args: Any) -> Any:
    """`m(*args)`, calling `m.forward` directly when `nn.Module.__call__` would do nothing else: no hook on
    `m` or global, not compiled (`m.compile()`), not tracing. A decode step makes ~75 module calls, and
    `__call__`'s two Python frames cost ~0.9 us each (a few % of a small model's step)."""
    return m.forward(*args) if plain_call(m) else m(*args)


def plain_call(m: nn.Module) -> bool:
    """True when calling `m` would only run `m.forward` (see `call`)."""
    d = m.__dict__
    return not (d["_forward_pre_hooks"] or d["_forward_hooks"] or d["_backward_pre_hooks"] or d["_backward_hooks"]
                or d.get("_compiled_call_impl") is not None or type(m).__call__ is not _MODULE_CALL
                or _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1] or _GLOBAL_HOOKS[2] or _GLOBAL_HOOKS[3]
                or torch._C._get_tracing_state())


class EmbeddingModel(nn.Module):
    """Base of the models whose token embedding `wte` tells their dtype and device (BERT, T5): the
    parameter count, dtype, device and a no-op `init_buffers` (no computed tables) every loader expects."""

    def init_buffers(self, device=None) -> None:
        pass

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if exclude_embeddings else n

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight), computed in float32 (Zhang & Sennrich, 2019).

    `offset=1` is Gemma's form (weights stored as w - 1, initialised to 0), where the scale is
    also applied in float32 before casting back.
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._parameters["weight"]
        # one op; not while tracing (ONNX export: no rms_norm before opset 23). The tracing state is a C
        # flag (`torch.jit.is_tracing` reads it; `torch.onnx.is_in_onnx_export()` is an import per call)
        if x.dtype is torch.float32 and w.dtype is torch.float32 and not torch._C._get_tracing_state():
            grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
            if x.numel() <= KERNEL_ELEMS and not grad and kernels.readable(x):
                use = self.__dict__.get("_kernel")
                if use is None:  # LLMKIT_NO_KERNELS is read once per module
                    use = self.__dict__["_kernel"] = kernels.available()
                if use:  # a decode step's few rows: llmkit's kernel (one C call, a third of torch.rms_norm's cost)
                    return kernels.rms_norm(x, w, self.eps, self.offset, kernels.build())
            return torch.rms_norm(x, w.shape, w + self.offset if self.offset else w, self.eps)
        w = w + self.offset if self.offset else w
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * w.float()).to(x.dtype)
        return w * h.to(x.dtype)


def add_norm(norm: nn.Module, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + h, norm(x + h)): a residual add and the next pre-norm; one C call for an RMSNorm in a decode
    step (a few fp32 rows, no autograd, no hook on the norm), else the add and `call(norm, ...)`."""
    if type(norm) is RMSNorm and x.numel() <= KERNEL_ELEMS and x.shape == h.shape and not torch.is_grad_enabled() \
            and kernels.readable(x) and kernels.readable(h) and plain_call(norm) \
            and (lib := kernels.decode_lib()) is not None:
        w = norm._parameters["weight"]
        if kernels.readable(w):
            return kernels.add_rms_norm(x, h, w, norm.eps, norm.offset, lib)
    x = x + h
    return x, call(norm, x)


def embedding(num_embeddings: int, embedding_dim: int, **kw) -> nn.Embedding:
    """`nn.Embedding(num_embeddings, embedding_dim, **kw)`; built on the meta device (the checkpoint
    loader) it skips its own N(0, 1) init. That init on a meta tensor runs through `torch._refs`, which
    imports torch._dynamo: ~1.6 s, and ~300k Python objects that every later full garbage collection
    walks (a ~250 ms pause in a serving process). Models initialise their weights themselves."""
    if torch.empty(0).device.type == "meta":
        kw["_weight"] = torch.empty(num_embeddings, embedding_dim)
    return nn.Embedding(num_embeddings, embedding_dim, **kw)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over `dim` features (default n_embd): RMSNorm, or LayerNorm (with or without bias)."""
    dim = dim or cfg.n_embd
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_offset)
    return nn.LayerNorm(dim, cfg.norm_eps, bias=cfg.norm_bias)


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
