"""A decode-specialised forward pass over a `Transformer`'s weights.

The model's `forward` is written for training and clarity; a decode step (1 token per row) is
bound by weight reads and per-op overhead instead. This path does the same math with fewer
tensor ops per layer: `F.rms_norm`, the model's fused qkv and gate/up projections, RoPE from a
precomputed cos/sin table (one roll + one fused multiply-add for q and k together), and no
per-step input checks. Models it does not cover (learned/ALiBi/sinusoidal positions, LayerNorm,
dynamic RoPE, GELU MLPs) use the model's own forward.

Matmul kernels on CPU (measured on the shared 2-core AMD EPYC dev box, fp32):
- oneDNN with weights pre-packed into its blocked layout is 2-3x faster than MKL's `F.linear` for
  a few rows (batched decode) and as fast for one row, so every projection uses packed weights.
- For the 32000x512 lm_head and one row, MKL reading the weight input-major ([in, out]
  contiguous) beats both (~7-8 ms vs ~10 ms oneDNN, ~17 ms `F.linear` on the row-major weight).
The packed/transposed copies cost extra memory (about one copy of the weights; see
docs/benchmarks.md); the model itself is never modified. `packed=False` turns them off. The
copies are rebuilt when the model's weights change (e.g. sampling during training).
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
    sc = cfg.rope_scaling or {}
    return (
        cfg.pos == "rope"
        and sc.get("rope_type", sc.get("type")) != "dynamic"
        and all(isinstance(b.ln_1, RMSNorm) and isinstance(b.ln_2, RMSNorm) for b in model.blocks)
        and isinstance(model.ln_f, RMSNorm)
        and all(not isinstance(b.mlp, MLP) or b.mlp.swiglu for b in model.blocks)
        and cfg.activation == "silu"
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
    """y = x W^T + b with the fastest kernel for the number of rows (see the module docstring)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, packed: bool, single_row_transposed: bool = False):
        self.weight, self.bias = weight, bias  # the model's parameters
        self.out_features, self.in_features = weight.shape
        w = weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 8) if packed else None
        # [out, in] values with [in, out]-contiguous storage, for MKL's one-row path
        self.weight_t = w.t().contiguous().t() if packed and single_row_transposed else None

    def __call__(self, x: Tensor, rows_hint: int) -> Tensor:
        if rows_hint == 1 and self.weight_t is not None:
            return F.linear(x, self.weight_t, self.bias)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


class FastDecoder:
    """`decoder(ids, positions, cache, masks) -> last-position logits [B, V]` for a supported model."""

    def __init__(self, model: Transformer, packed: bool = True):
        cfg = model.config
        self.model = model
        self.H, self.Hkv, self.D, self.C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
        packed = packed and model.device.type == "cpu" and model.dtype == torch.float32 and _onednn_ok()
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
                Linear(b.attn.qkv.weight, b.attn.qkv.bias, packed),
                Linear(b.attn.proj.weight, b.attn.proj.bias, packed),
                b.ln_2.weight, b.ln_2.eps,
                Linear(b.mlp.fc.weight, b.mlp.fc.bias, packed) if dense else None,
                Linear(b.mlp.proj.weight, b.mlp.proj.bias, packed) if dense else b.mlp,
                b.attn.window,
            ))  # fmt: skip
        self.lm_head = Linear(model.lm_head.weight, None, packed, single_row_transposed=True)
        self.version = weights_version(model)

    def __call__(self, ids: Tensor, positions: Tensor, cache, masks: dict[int | None, Tensor | None]) -> Tensor:
        """ids, positions [B, T]; `cache` has `update(layer, k, v)`; masks per sliding window (None = causal)."""
        B, T = ids.shape
        H, Hkv, D, C = self.H, self.Hkv, self.D, self.C
        n = B * T  # rows per matmul
        x = F.embedding(ids, self.model.wte.weight)  # [B, T, C]
        cos = self.cos[positions][:, None]  # [B, 1, T, D]
        sin = self.sin_signed[positions][:, None]
        for i, (w1, eps1, qkv_proj, o_proj, w2, eps2, fc, down, window) in enumerate(self.layers):
            h = F.rms_norm(x, (C,), w1, eps1)
            qkv = qkv_proj(h, n).view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # [B, H+2Hkv, T, D]
            qk = qkv[:, : H + Hkv]
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)  # RoPE on q and k at once
            k, v = cache.update(i, qk[:, H:], qkv[:, H + Hkv :])  # [B, Hkv, S, D]
            mask = masks[window]
            y = F.scaled_dot_product_attention(
                qk[:, :H], k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=Hkv != H
            )  # [B, H, T, D]
            x = x + o_proj(y.transpose(1, 2).reshape(B, T, H * D), n)
            h = F.rms_norm(x, (C,), w2, eps2)
            if fc is not None:  # dense SwiGLU
                gate, up = fc(h, n).chunk(2, dim=-1)
                x = x + down(F.silu(gate) * up, n)
            else:  # sparse MoE: the model's own module
                x = x + down(h)
        x = F.rms_norm(x[:, -1], (C,), self.model.ln_f.weight, self.model.ln_f.eps)  # [B, C]
        return self.lm_head(x, B)  # [B, V]
