"""Kinds of Linear: every projection of a model is an attribute holding an `nn.Module` that maps
[..., in_features] -> [..., out_features]; the model's forward just calls it.

- dense: plain `nn.Linear` (training, GPUs, checkpoints);
- packed-for-decode: `PackedLinear` below, the same parameters plus CPU-kernel-friendly copies;
- later kinds (LoRA, int8/int4, low-rank) plug in the same way with `model.set_submodule(name, kind)`.

Why packed copies (fp32 CPU, measured on the shared 2-core AMD EPYC dev box, 8 layers of weights,
101 MB, streamed from memory as in a real decode step):
- up to `KERNEL_ROWS` rows (a batch-1 decode step): llmkit's own kernel (`kernels.f32_mm`, one weight
  row at a time, a single stream per thread) on a copy of the row-major weight in 2 MB pages reads the
  weights at the memory-read floor: 1.5x faster than the input-major / blocked MKL paths below, which
  remain for when the kernel library cannot be built (`LLMKIT_NO_KERNELS=1`, no C compiler);
- batch 1 without it: `F.linear` on the row-major [out, in] weight runs at ~6 GB/s (MKL), the same weight
  stored input-major ([in, out] contiguous) at 11-13 GB/s, oneDNN packed at ~8 GB/s; so batch 1 uses
  input-major copies. With more than one thread a single row goes through one `bmm` over column
  blocks of W^T instead: MKL runs a single-row product on one core, `bmm` spreads the blocks over
  all of them (lm_head 5.1 -> 2.2 ms, 2 threads);
- batch > 1: oneDNN with weights pre-packed into its blocked layout is 2-4x faster than MKL
  (8 rows: 12.7 ms vs 23-59 ms).
Each copy is made on first use (one extra copy of the weights, see docs/benchmarks.md) and rebuilt
when the weight changes in place or is replaced; off CPU/fp32 it is `F.linear`. A graph that trains
through the layer (its weight, or its input under a frozen weight: LoRA's base, a frozen head) runs
on the plain weight through oneDNN, forward and backward (no copy; 2x MKL's fp32 GEMM on this AMD
box, see `dense_linear`): an RL policy's update after its rollouts, for one.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llmkit.model import kernels

KERNEL_ROWS = 2  # up to this many rows llmkit's fp32 kernel beats oneDNN's packed one (docs/benchmarks.md)


@functools.cache
def _onednn_ok() -> bool:
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4), 8)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4), w, None, "none", [], "")
        return bool(torch.allclose(y, torch.full((2, 4), 4.0)))
    except (RuntimeError, AttributeError):
        return False


def dense_linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b, [..., in] x [out, in] -> [..., out], no autograd: oneDNN on CPU fp32 (any strides of W,
    e.g. W.t() for an input gradient; ~2.2x MKL's sgemm per core on AMD EPYC, where MKL takes its AVX2
    path), else `F.linear`."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or not _onednn_ok():
        return F.linear(x, w, bias)
    if x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, bias, "none", [], "")
    return y.view(*x.shape[:-1], w.shape[0])


class DenseLinearFunction(torch.autograd.Function):
    """y = x W^T + b with every product on `dense_linear` (oneDNN on CPU fp32), forward and backward:
    dx = dy W, dW = dy^T x, db = the column sums of dy, each only when its input needs a gradient
    (a frozen W: LoRA's base, a frozen head). x [M, in] -> y [M, out] (2-D: the output must not be a
    view made inside the Function)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x if w.requires_grad else None, w)
        return dense_linear(x, w, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        dx = dense_linear(dy, w.t()) if ctx.needs_input_grad[0] else None  # [M, in]
        dw = dense_linear(dy.t(), x.t()) if ctx.needs_input_grad[1] else None  # [out, in]
        db = dy.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db


class PackedLinear(nn.Linear):
    """Dense y = x W^T + b (same `weight`/`bias` parameters, same state_dict) with the faster CPU
    kernel for the batch size: llmkit's fp32 kernel on a 2 MB-page copy for <= KERNEL_ROWS rows (input-major
    or column-blocked MKL copies without the kernel library), oneDNN-packed for more."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # shared with the dense module
        self._copies: dict[str, Tensor] = {}
        self._version: tuple = ()
        self._source: Tensor | None = None

    def _copy(self, kind: str):
        w = self._parameters["weight"]
        version = (w._version, w.data_ptr())
        if version != self._version or self._source is None:
            # `_source` holds the weight's storage: a weight replaced through `.data` cannot free it, so a new
            # weight never reuses its address (AWQ swaps candidate weights in; a reused address read stale copies)
            self._copies, self._version, self._source = {}, version, w.detach()
        c = self._copies.get(kind, False)
        if c is False:
            w = w.detach()
            if kind == "kernel":  # llmkit's fp32 kernel (LLMKIT_NO_KERNELS is read here) and the weight, row-major
                lib = kernels._lib()  # as it is, in memory backed by 2 MB pages
                c = (lib, kernels.huge_copy(w)) if lib is not None else None
            elif kind == "input_major":  # [out, in] values in [in, out]-contiguous storage
                c = w.t().contiguous().t()
            elif kind == "blocks":  # [nb, in, out/nb]: column blocks for one batched matmul
                nb = self._n_blocks()
                c = w.view(nb, self.out_features // nb, self.in_features).transpose(1, 2).contiguous()
            else:  # oneDNN blocked layout
                c = torch.ops.mkldnn._reorder_linear_weight(w, 8)
            self._copies[kind] = c
        return c

    def _apply(self, fn, recurse: bool = True):  # .to() / .half() / ...: the copies (and the old storage) go
        self._copies, self._version, self._source = {}, (), None
        return super()._apply(fn, recurse)

    def _n_blocks(self) -> int:
        return 8 if self.out_features >= 8192 else 2

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        # the decode hot path: parameters read from `_parameters` (no nn.Module.__getattr__ fallback)
        params = self._parameters
        w, bias = params["weight"], params.get("bias")
        # the packed copies have no backward: a graph through this layer (a trained weight, or LoRA's frozen
        # base under a trained input) runs on the plain weight through oneDNN, forward and backward
        cpu32 = w.is_cpu and w.dtype is torch.float32
        if (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) or not cpu32:
            # (a trained weight under CPU autocast keeps F.linear, which autocast casts)
            if cpu32 and x.dtype is torch.float32 and not (w.requires_grad and torch.is_autocast_enabled("cpu")):
                y = DenseLinearFunction.apply(x.reshape(-1, self.in_features), w, bias)
                return y.view(*x.shape[:-1], self.out_features)
            return F.linear(x, w, bias)
        if x.numel() <= KERNEL_ROWS * self.in_features and x.shape[-1] == self.in_features and kernels.readable(x) \
                and kernels.readable(w):
            wk = self._copy("kernel")  # (library, weight in 2 MB pages), or None without llmkit's kernels
            if wk is not None:
                return kernels.f32_mm(x, wk[1], bias, wk[0])  # [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features)  # [M, in]
        if rows.shape[0] == 1:
            if torch.get_num_threads() > 1 and self.out_features % self._n_blocks() == 0:
                blocks = self._copy("blocks")  # [nb, in, out/nb]
                y = torch.bmm(rows.expand(blocks.shape[0], 1, self.in_features), blocks)  # [nb, 1, out/nb]
                y = y.view(*x.shape[:-1], self.out_features)  # one row: the blocks are already in column order
                return y if bias is None else y + bias
            return F.linear(x, self._copy("input_major"), bias)
        if not _onednn_ok():
            return F.linear(x, self._copy("input_major"), bias)
        y = torch.ops.mkldnn._linear_pointwise(rows, self._copy("onednn"), bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed for decode"

    def __getstate__(self) -> dict:
        """Copies and pickles carry the parameters, not the packed copies (oneDNN's are opaque tensors
        that cannot be copied); they are rebuilt on first use."""
        state = self.__dict__.copy()
        state["_copies"], state["_version"], state["_source"] = {}, (), None
        return state


def set_decode_packing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Swap every dense `nn.Linear` of `model` for a `PackedLinear` (or back, `enabled=False`).

    Only exact dense modules change kind: LoRA, quantized or other Linear kinds stay as they are.
    Parameters and state_dict keys are untouched. Returns `model`.
    """
    for name, m in list(model.named_modules()):
        if enabled and type(m) is nn.Linear:
            model.set_submodule(name, PackedLinear(m))
        elif not enabled and type(m) is PackedLinear:
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            dense.weight, dense.bias = m.weight, m.bias
            model.set_submodule(name, dense)
    return model
