"""A decode-specialised forward pass over a `Transformer`'s weights.

The model's `forward` is written for training and clarity; a decode step (1 token per row) is
bound by weight reads and per-op overhead instead. This path does the same math with fewer
tensor ops per layer: `F.rms_norm`, the model's fused qkv and gate/up projections, RoPE from a
precomputed cos/sin table (one roll + one fused multiply-add for q and k together), and no
per-step input checks. Models it does not cover (learned/ALiBi/sinusoidal positions, LayerNorm,
dynamic RoPE, GELU MLPs) use the model's own forward.

Matmul kernels on CPU (fp32; measured on the shared 2-core AMD EPYC dev box with 8 layers of
weights, 101 MB, streamed from memory as in a real decode step):
- batch 1: `F.linear` on the row-major [out, in] weight that `nn.Linear` keeps runs at ~6 GB/s
  (MKL), the same weight stored input-major ([in, out] contiguous) at 11-13 GB/s, oneDNN packed at
  ~8 GB/s; so batch 1 uses input-major copies (the lm_head included). With more than one thread,
  a single row goes through one `bmm` over column blocks of W^T instead: MKL runs a single-row
  product on one core, `bmm` spreads the blocks over all of them (lm_head 5.1 -> 2.2 ms, 2 threads);
- batch > 1: oneDNN with weights pre-packed into its blocked layout is 2-4x faster than MKL
  either way (8 rows: 12.7 ms vs 23-59 ms), so larger batches use packed copies.
Each copy is made on first use and costs one extra copy of the weights (see docs/benchmarks.md);
the model itself is never modified, and the copies are rebuilt when its weights change (e.g.
sampling during training). `FastDecoder(model, copies=False)` uses the model's weights as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkit.model.positions import rope_inv_freq
from llmkit.model.transformer import MLP, RMSNorm, Transformer


def supports(model: torch.nn.Module) -> bool:
    """True when `FastDecoder` computes exactly what `model.forward` computes."""
    if not isinstance(model, Transformer):
        return False
    cfg = model.config
    return (
        cfg.pos == "rope"
        and cfg.rope_type != "dynamic"
        and all(isinstance(b.ln_1, RMSNorm) and isinstance(b.ln_2, RMSNorm) for b in model.blocks)
        and isinstance(model.ln_f, RMSNorm)
        and all(not isinstance(b.mlp, MLP) or b.mlp.swiglu for b in model.blocks)
        and cfg.activation == "silu"
        and all(type(m) is torch.nn.Linear for b in model.blocks for m in (b.attn.qkv, b.attn.proj))
        and all(type(m) is torch.nn.Linear for b in model.blocks if isinstance(b.mlp, MLP)
                for m in (b.mlp.fc, b.mlp.proj))
        and not model.training
    )


def weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter is updated in place or replaced."""
    return tuple((p._version, p.data_ptr()) for p in model.parameters())


def _onednn_ok() -> bool:
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4), 8)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4), w, None, "none", [], "")
        return bool(torch.allclose(y, torch.full((2, 4), 4.0)))
    except (RuntimeError, AttributeError):
        return False


class Linear:
    """y = x W^T + b with the faster CPU kernel for the batch size (see the module docstring).

    The kernel-friendly copies of the weight are made on first use: input-major for batch 1,
    oneDNN-packed for larger batches.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, enabled: bool, onednn: bool):
        self.weight, self.bias = weight, bias  # the model's parameters, never modified
        self.out_features, self.in_features = weight.shape
        self.enabled, self.onednn = enabled, onednn
        self.input_major: Tensor | None = None  # [out, in] values in [in, out]-contiguous storage
        self.packed: Tensor | None = None  # oneDNN blocked layout
        self.blocks: Tensor | None = None  # [nb, in, out/nb]: column blocks for one batched matmul

    def __call__(self, x: Tensor, batch: int) -> Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        if batch == 1 and torch.get_num_threads() > 1 and self.out_features % self._n_blocks() == 0:
            return self._blocked(x)
        if batch == 1 or not self.onednn:
            if self.input_major is None:
                self.input_major = self.weight.detach().t().contiguous().t()
            return F.linear(x, self.input_major, self.bias)
        if self.packed is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 8)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def _n_blocks(self) -> int:
        return 8 if self.out_features >= 8192 else 2

    def _blocked(self, x: Tensor) -> Tensor:
        """Batch-1 matmul as `bmm` over column blocks of W^T: MKL parallelises a single-row product
        poorly across threads, but spreads the blocks of one `bmm` over all of them."""
        if self.blocks is None:
            nb = self._n_blocks()
            w = self.weight.detach()
            self.blocks = w.view(nb, self.out_features // nb, self.in_features).transpose(1, 2).contiguous()
        nb = self.blocks.shape[0]
        rows = x.reshape(-1, self.in_features)  # [M, in]
        y = torch.bmm(rows.expand(nb, *rows.shape), self.blocks)  # [nb, M, out/nb]
        y = y.transpose(0, 1).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class FastDecoder:
    """`decoder(ids, positions, cache, masks) -> last-position logits [B, V]` for a supported model."""

    def __init__(self, model: Transformer, copies: bool = True):
        cfg = model.config
        self.model = model
        self.H, self.Hkv, self.D, self.C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
        enabled = copies and model.device.type == "cpu" and model.dtype == torch.float32
        onednn = enabled and _onednn_ok()
        inv_freq = rope_inv_freq(cfg).to(model.device)  # [D/2]
        angles = torch.arange(cfg.block_size, device=model.device).float()[:, None] * inv_freq[None]  # [n, D/2]
        self.cos = torch.cat([angles.cos(), angles.cos()], -1).to(model.dtype)  # [n, D]
        # rotate_half(x) * sin == roll(x, D/2) * [-sin, sin]
        self.sin_signed = torch.cat([-angles.sin(), angles.sin()], -1).to(model.dtype)  # [n, D]
        self.layers = []
        for b in model.blocks:
            dense = isinstance(b.mlp, MLP)
            self.layers.append((
                b.ln_1.weight, b.ln_1.eps,
                Linear(b.attn.qkv.weight, b.attn.qkv.bias, enabled, onednn),
                Linear(b.attn.proj.weight, b.attn.proj.bias, enabled, onednn),
                b.ln_2.weight, b.ln_2.eps,
                Linear(b.mlp.fc.weight, b.mlp.fc.bias, enabled, onednn) if dense else None,
                Linear(b.mlp.proj.weight, b.mlp.proj.bias, enabled, onednn) if dense else b.mlp,
                b.attn.window,
            ))  # fmt: skip
        self.lm_head = Linear(model.lm_head.weight, None, enabled, onednn)
        self.version = weights_version(model)

    def __call__(self, ids: Tensor, positions: Tensor, cache, masks: dict[int | None, Tensor | None]) -> Tensor:
        """ids, positions [B, T]; `cache` has `update(layer, k, v)`; masks per sliding window (None = causal)."""
        B, T = ids.shape
        H, Hkv, D, C = self.H, self.Hkv, self.D, self.C
        x = F.embedding(ids, self.model.wte.weight)  # [B, T, C]
        cos = self.cos[positions][:, None]  # [B, 1, T, D]
        sin = self.sin_signed[positions][:, None]
        for i, (w1, eps1, qkv_proj, o_proj, w2, eps2, fc, down, window) in enumerate(self.layers):
            h = F.rms_norm(x, (C,), w1, eps1)
            qkv = qkv_proj(h, B).view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # [B, H+2Hkv, T, D]
            qk = qkv[:, : H + Hkv]
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)  # RoPE on q and k at once
            k, v = cache.update(i, qk[:, H:], qkv[:, H + Hkv :])  # [B, Hkv, S, D]
            mask = masks[window]
            y = F.scaled_dot_product_attention(
                qk[:, :H], k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=Hkv != H
            )  # [B, H, T, D]
            x = x + o_proj(y.transpose(1, 2).reshape(B, T, H * D), B)
            h = F.rms_norm(x, (C,), w2, eps2)
            if fc is not None:  # dense SwiGLU
                gate, up = fc(h, B).chunk(2, dim=-1)
                x = x + down(F.silu(gate) * up, B)
            else:  # sparse MoE: the model's own module
                x = x + down(h)
        x = F.rms_norm(x[:, -1], (C,), self.model.ln_f.weight, self.model.ln_f.eps)  # [B, C]
        return self.lm_head(x, B)  # [B, V]


def cached_decoder(model: torch.nn.Module) -> FastDecoder | None:
    """The model's `FastDecoder`, built once and rebuilt when its weights change; None when the
    model is not one it covers."""
    if not supports(model):
        return None
    dec = model.__dict__.get("_llmkit_fast_decoder")
    if dec is None or dec.version != weights_version(model):
        dec = FastDecoder(model)
        model.__dict__["_llmkit_fast_decoder"] = dec
    return dec
