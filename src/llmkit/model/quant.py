"""Quantized Linear kinds and the quantizers that produce them: RTN, GPTQ, AWQ, SmoothQuant W8A8, QAT.

Every kind is an `nn.Module` mapping [..., in] -> [..., out], swapped into the model in place of an
`nn.Linear` (the forward just calls it). Decode reads fewer bytes because the matmuls run on integer
kernels: llmkit's own (`model/kernels.py`: int16 activations per row, exact int32 sums, fp32 scales),
or PyTorch's weight-only CPU kernels when no C compiler is there:
- `Int8Linear`: symmetric int8, per output channel or group-wise (`_weight_int8pack_mm` per channel
  as the fallback; group-wise dequantized per call there);
- `Int4Linear`: group-wise asymmetric int4 with zero points, 0.5 byte per weight
  (`_weight_int4pack_mm_for_cpu` on a packed copy as the fallback);
- `W8A8Linear`: int8 weights x int8 activations (`torch._int_mm`), activations quantized per token
  on the fly or with a static KL-calibrated scale, after SmoothQuant's migration;
- `FakeQuantLinear`: quantization-aware training (fake quantization, straight-through estimator);
- `Int8Embedding`: int8 rows with one scale per row.

A weight-only kind may carry `input_scale` [in] (AWQ): it computes Q(W diag(s)) (x / s).
The math (RTN, GPTQ, AWQ, SmoothQuant, KL) is plain tensor code fed with calibration activations;
loading calibration text and writing folders happen above this layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llmkit.errors import ConfigError, InputError
from llmkit.model import kernels
from llmkit.model.linear import set_decode_packing

INT4_GROUPS = (32, 64, 128, 256)  # what the CPU int4 kernel accepts


# ============================================================================ quantization grids
@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix [out, in] is quantized: bits 8 (symmetric) or 4 (asymmetric, zero points).

    group_size 0 = one scale per output channel; else one (scale, zero) per `group_size` inputs.
    """

    bits: int = 8
    group_size: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"bits must be 4 or 8, got {self.bits}")
        if self.bits == 4 and self.group_size not in INT4_GROUPS:
            raise ConfigError(f"int4 needs group_size in {INT4_GROUPS} (the CPU kernel's), got {self.group_size}")
        if self.group_size < 0:
            raise ConfigError(f"group_size must be >= 0 (0 = per channel), got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -128 if self.bits == 8 else 0

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 15

    def padded_in(self, k: int) -> int:
        g = self.group_size
        return k if g == 0 else -(-k // g) * g

    def params(self, w: Tensor, clip: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(scale, zero) per row of w [N, k] (the columns of one group, or all of them): [N] each.
        `clip` (<= 1) shrinks the range the grid covers (AWQ's clipping search)."""
        if self.bits == 8:  # symmetric: zero = 0
            scale = w.abs().amax(-1).clamp(min=1e-8) / 127
            scale = scale if clip is None else scale * clip
            return scale, torch.zeros_like(scale)
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)  # the grid always holds 0
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        scale = (hi - lo).clamp(min=1e-8) / 15
        return scale, (-lo / scale).round().clamp(0, 15)

    def quantize(self, w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """Integer codes of w [N, k] with per-row scale/zero [N] (or broadcastable)."""
        return (w / scale[..., None] + zero[..., None]).round().clamp(self.qmin, self.qmax)

    def grid(self, w: Tensor, clip: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """RTN of w [N, K] on this spec: codes [N, Kp], scales [N, G], zeros [N, G] (K padded with 0).
        `clip` [N, G] (or a scalar): per-group range shrink factors."""
        N, K = w.shape
        Kp = self.padded_in(K)
        w = F.pad(w.float(), (0, Kp - K))
        g = self.group_size or Kp
        wg = w.view(N, Kp // g, g)
        scale, zero = self.params(wg, clip)  # [N, G]
        return self.quantize(wg, scale, zero).view(N, Kp), scale, zero

    def fake(self, w: Tensor, clip: Tensor | None = None) -> Tensor:
        """Quantize-dequantize w [N, K] (same shape and dtype)."""
        q, s, z = self.grid(w, clip)
        return dequantize(q, s, z)[:, : w.shape[1]].to(w.dtype)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """w [N, Kp] = (q - zero) * scale, with per-group scale/zero [N, G]."""
    N, Kp = q.shape
    G = scale.shape[1]
    w = (q.float().view(N, G, Kp // G) - zero[..., None]) * scale[..., None]
    return w.view(N, Kp)


def spec_for(dtype: torch.dtype | str, group_size: int | None) -> QuantSpec:
    """`dtype` torch.int8 / "int8" / "int4" and a group size (None or 0 = per channel, int8 only)."""
    name = {torch.int8: "int8"}.get(dtype, dtype) if isinstance(dtype, torch.dtype) else str(dtype)
    if name not in ("int8", "int4"):
        raise ConfigError(f"dtype must be torch.int8, 'int8' or 'int4', got {dtype!r}")
    return QuantSpec(8 if name == "int8" else 4, group_size or 0)


# ============================================================================ Linear kinds
def _tensor_key(t: Tensor) -> tuple:
    """Identifies a tensor's contents for cached copies: (version counter, storage address); inference
    tensors have no version counter (and cannot be changed in place outside inference mode)."""
    try:
        return t._version, t.data_ptr()
    except RuntimeError:
        return None, t.data_ptr()


class FrozenQuantMatmul(torch.autograd.Function):
    """y = m(x) for a quantized kind m (frozen), differentiable in x: dx = dy W with W dequantized, as
    QLoRA (Dettmers et al., 2023) backpropagates through its 4-bit base to the adapters."""

    @staticmethod
    def forward(ctx, x: Tensor, m: nn.Module) -> Tensor:
        ctx.m = m
        y = m(x)  # grad mode is off in here: the kernel path
        return y if y._base is None else y.clone()  # not a view: adapters add to it in place

    @staticmethod
    def backward(ctx, dy: Tensor):
        return dy @ ctx.m.weight_float().to(dy.dtype), None


class WeightOnlyLinear(nn.Module):
    """The forward of Int8Linear and Int4Linear: llmkit's kernel bound to the buffers (`_kernel_weight`) on
    CPU, else the kind's PyTorch path (`_pytorch_mm`); differentiable in x for adapters trained on top."""

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        if x.requires_grad and torch.is_grad_enabled():  # adapters train on top (QLoRA)
            return FrozenQuantMatmul.apply(x, self)
        buffers = self._buffers  # the decode hot path: no nn.Module.__getattr__, no reshapes
        if buffers["input_scale"] is not None:
            x = x / buffers["input_scale"]
        mm = self._kernel_weight() if x.is_cpu else None
        if mm is not None:  # llmkit's kernel (kernels.py)
            y = mm(x)
        else:
            y = self._pytorch_mm(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        if buffers["bias"] is not None:
            y = y + buffers["bias"]
        return y if y.dtype is x.dtype else y.to(x.dtype)

    def _kernel_weight(self) -> kernels.QuantMatmul | None:
        raise NotImplementedError

    def _pytorch_mm(self, x2: Tensor) -> Tensor:
        raise NotImplementedError

    def __getstate__(self) -> dict:  # copies and pickles: the kernel binding holds raw pointers, rebuilt on use
        return {**super().__getstate__(), "_kernel_w": None, "_kernel_src": ()}


class Int8Linear(WeightOnlyLinear):
    """y = x W^T + b with W int8 [out, in]: per-channel scales [out] or group-wise scales [out, G]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 0,
                 input_scale: bool = False, device=None, dtype=torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # the int8 kernel needs in % 16 == 0 (else wrong results or a crash): zero columns pad it
        Kp = QuantSpec(8, group_size).padded_in(in_features) if group_size else -(-in_features // 16) * 16
        self.Kp = Kp
        G = Kp // group_size if group_size else 1
        self.register_buffer("qweight", torch.zeros(out_features, Kp, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, G, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_scale", torch.ones(in_features, dtype=dtype, device=device)
                             if input_scale else None)
        self._scales_bf16: Tensor | None = None  # the kernel's copy, made on first use
        self._kernel_w: tuple | bool | None = None  # llmkit's kernel's weights and scales (`_kernel_weight`)
        self._kernel_src: tuple = ()

    @classmethod
    def from_codes(cls, q: Tensor, scale: Tensor, bias: Tensor | None, in_features: int, group_size: int,
                   input_scale: Tensor | None = None) -> Int8Linear:
        m = cls(in_features, q.shape[0], bias is not None, group_size, input_scale is not None, device="meta")
        m.qweight = F.pad(q.to(torch.int8), (0, m.Kp - q.shape[1])).contiguous()
        m.scales = scale.float().contiguous()
        m.bias = None if bias is None else bias.detach().float().clone()
        m.input_scale = None if input_scale is None else input_scale.float().contiguous()
        return m

    def _pytorch_mm(self, x2: Tensor) -> Tensor:  # [M, in] -> [M, out] fp32, without llmkit's kernels
        if self.Kp > self.in_features:
            x2 = F.pad(x2, (0, self.Kp - self.in_features))
        if self.group_size == 0:  # PyTorch's weight-only int8 kernel (its vectorised path takes bf16 inputs)
            if self._scales_bf16 is None or self._scales_bf16.device != x2.device:
                self._scales_bf16 = self.scales[:, 0].to(torch.bfloat16)
            return torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self._scales_bf16).float()
        return F.linear(x2.float(), dequantize(self.qweight, self.scales, torch.zeros_like(self.scales)))

    def _kernel_weight(self) -> kernels.QuantMatmul | None:
        """llmkit's kernel bound to this layer's weights (K padded to its 32-wide step: `qweight` itself when it
        already is), fp32 scales and group sums of the weights; made once and again when a buffer changes;
        None when that kernel is unavailable or groups are not a multiple of 32."""
        w, s = self._buffers["qweight"], self._buffers["scales"]
        key = (_tensor_key(w), _tensor_key(s))
        if self._kernel_w is None or self._kernel_src != key:
            lib = kernels._lib()
            ok = lib is not None and w.device.type == "cpu" and self.group_size % kernels.ALIGN == 0
            self._kernel_src = key
            Kp = -(-self.Kp // kernels.ALIGN) * kernels.ALIGN
            w = w if Kp == self.Kp else F.pad(w, (0, Kp - self.Kp)).contiguous()
            s = s.float().contiguous()
            self._kernel_w = kernels.QuantMatmul(8, w, s, kernels.int8_wsum(w, s.shape[1]), lib,
                                                  self.in_features) if ok else False
        return self._kernel_w if self._kernel_w is not False else None

    def weight_float(self) -> Tensor:
        """The dequantized weight [out, in] (what the kernel multiplies by)."""
        w = dequantize(self.qweight, self.scales, torch.zeros_like(self.scales))[:, : self.in_features]
        return w if self.input_scale is None else w / self.input_scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size or 'channel'}"


class Int4Linear(WeightOnlyLinear):
    """y = x W^T + b with W int4 (asymmetric, per-group scale and zero point): w = (q - zero) * scale.

    Buffers (= the state dict): `qweight` [out, Kp/2] uint8 (two codes per byte, low nibble first; K
    padded to the group), `scales` [out, G] fp32, `zeros` [out, G] uint8. llmkit's kernel
    (`model/kernels.py`) reads them as they are; without it, PyTorch's `_weight_int4pack_mm_for_cpu`
    runs on a packed copy made on first use (bf16 scales and activations).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64,
                 input_scale: bool = False, device=None, dtype=torch.float32) -> None:
        super().__init__()
        spec = QuantSpec(4, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.Kp, self.Np = spec.padded_in(in_features), -(-out_features // 16) * 16
        G = self.Kp // group_size
        self.register_buffer("qweight", torch.zeros(out_features, self.Kp // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, G, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, G, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_scale", torch.ones(in_features, dtype=dtype, device=device)
                             if input_scale else None)
        self._pt: tuple = ()  # PyTorch's packed copy (fallback): (source version, packed, scales_and_zeros)
        self._kernel_w: kernels.QuantMatmul | bool | None = None  # llmkit's kernel for these buffers (or False)
        self._kernel_src: tuple = ()

    @classmethod
    def from_codes(cls, q: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None, in_features: int,
                   group_size: int, input_scale: Tensor | None = None) -> Int4Linear:
        """From codes q [out, Kp] in 0..15, scale and zero [out, G]: w = (q - zero) * scale."""
        m = cls(in_features, q.shape[0], bias is not None, group_size, input_scale is not None, device="meta")
        qi = q.round().to(torch.uint8)
        m.qweight = (qi[:, 0::2] | (qi[:, 1::2] << 4)).contiguous()
        m.scales = scale.float().contiguous()
        m.zeros = zero.round().to(torch.uint8).contiguous()
        m.bias = None if bias is None else bias.detach().float().clone()
        m.input_scale = None if input_scale is None else input_scale.float().contiguous()
        return m

    def codes(self) -> tuple[Tensor, Tensor, Tensor]:
        """(q [out, Kp], scale [out, G], zero [out, G]) as floats."""
        p = self.qweight
        q = torch.stack([p & 15, p >> 4], -1).view(p.shape[0], -1)
        return q.float(), self.scales.float(), self.zeros.float()

    def _packed(self) -> tuple[Tensor, Tensor]:
        """PyTorch's int4 layout ([Np, Kp/2] packed, [G, Np, 2] bf16 scales and offsets), made on first use."""
        src = (_tensor_key(self.qweight), _tensor_key(self.scales), _tensor_key(self.zeros))
        if not self._pt or self._pt[0] != src:
            q, scale, zero = self.codes()
            pad = self.Np - q.shape[0]
            q = F.pad(q, (0, 0, 0, pad))
            scale, zero = F.pad(scale, (0, 0, 0, pad), value=1.0), F.pad(zero, (0, 0, 0, pad))
            rows = 1024  # converted in blocks so the int32 copy stays small (peak RSS)
            packed = torch.cat([
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[i : i + rows].to(torch.int32).contiguous(), 1)
                for i in range(0, self.Np, rows)
            ]).to(q.device)
            # the kernel computes w = (q - 8) * scale + offset  =>  offset = (8 - zero) * scale
            scale = scale.to(torch.bfloat16).float()
            sz = torch.stack([scale, (8 - zero) * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._pt = (src, packed, sz)
        return self._pt[1], self._pt[2]

    def _pytorch_mm(self, x2: Tensor) -> Tensor:  # [M, in] -> [M, out] fp32, without llmkit's kernels
        x2 = x2.to(torch.bfloat16)
        if self.Kp > self.in_features:
            x2 = F.pad(x2, (0, self.Kp - self.in_features))
        packed, sz = self._packed()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)
        return y[:, : self.out_features].float()

    def _kernel_weight(self) -> kernels.QuantMatmul | None:
        """llmkit's kernel bound to this layer's buffers as they are, made once and again when one changes (or
        is replaced); None when the kernel is unavailable (LLMKIT_NO_KERNELS is read here)."""
        b = self._buffers
        w, s, z = b["qweight"], b["scales"], b["zeros"]
        key = (_tensor_key(w), _tensor_key(s), _tensor_key(z))
        if self._kernel_w is None or self._kernel_src != key:
            lib = kernels._lib()
            self._kernel_src = key
            ok = lib is not None and w.device.type == "cpu"
            self._kernel_w = kernels.QuantMatmul(4, w, s.float().contiguous(), z.contiguous(), lib,
                                                  self.in_features) if ok else False
        return self._kernel_w if self._kernel_w is not False else None

    def weight_float(self) -> Tensor:
        q, s, z = self.codes()
        w = dequantize(q, s, z)[:, : self.in_features]
        return w if self.input_scale is None else w / self.input_scale

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        q = state_dict.get(prefix + "qweight")
        if q is not None and tuple(q.shape) != tuple(self.qweight.shape):
            error_msgs.append(f"{prefix}qweight holds codes of shape {(q.shape[0], 2 * q.shape[1])}, "
                              f"expected {(self.out_features, self.Kp)}")
            return
        for name in ("scales", "zeros"):  # folders may hold other dtypes
            t = state_dict.get(prefix + name)
            if t is not None:
                state_dict[prefix + name] = t.to(getattr(self, name).dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}"


class W8A8Linear(nn.Module):
    """int8 weights (per channel) x int8 activations (per token, dynamic; or one static scale), int32 accumulate.

    SmoothQuant (Xiao et al., 2023): inputs are divided by `smooth` [in] and the weight multiplied by it
    before quantization, moving activation outliers into the weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, static: bool = False,
                 device=None, dtype=torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("smooth", torch.ones(in_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("act_scale", torch.ones((), dtype=dtype, device=device) if static else None)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        xs = x.reshape(-1, self.in_features).float() / self.smooth
        if self.act_scale is None:  # dynamic, per token
            sx = xs.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127  # [M, 1]
        else:
            sx = self.act_scale.expand(xs.shape[0], 1)
        xq = (xs / sx).round().clamp(-128, 127).to(torch.int8)
        acc = int8_matmul(xq, self.qweight)  # [M, out] int32
        y = acc.float() * sx * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape, self.out_features)

    def extra_repr(self) -> str:
        mode = "static" if self.act_scale is not None else "dynamic per-token"
        return f"in={self.in_features}, out={self.out_features}, activations={mode}"


def int8_matmul(xq: Tensor, wq: Tensor) -> Tensor:
    """xq [M, K] int8 @ wq [N, K]^T int8 -> int32 [M, N] (`torch._int_mm`; exact)."""
    if xq.shape[0] > 16 and xq.shape[1] % 8 == 0 and wq.shape[0] % 8 == 0:
        return torch._int_mm(xq, wq.t())
    return (xq.to(torch.int32) @ wq.to(torch.int32).t())


class FakeQuantLinear(nn.Linear):
    """An `nn.Linear` whose forward sees its weight quantize-dequantized (QAT, Jacob et al., 2018).

    The straight-through estimator passes gradients to the float weight unchanged; the state dict is
    the dense one, so `quantize(...)` with the same spec later yields exactly the trained grid.
    """

    spec: QuantSpec

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        wq = w + (self.spec.fake(w) - w).detach()  # STE
        return F.linear(x, wq, self.bias)


class Int8Embedding(nn.Module):
    """Embedding rows stored int8 with one scale per row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, 1, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, w: Tensor) -> Int8Embedding:
        m = cls(*w.shape, device="meta")
        q, s, _ = QuantSpec(8, 0).grid(w.detach())
        m.qweight, m.scales = q.to(torch.int8), s.float()
        return m

    def forward(self, ids: Tensor) -> Tensor:  # [...] -> [..., dim]
        return F.embedding(ids, self.qweight).float() * F.embedding(ids, self.scales)


QUANT_KINDS = (Int8Linear, Int4Linear, W8A8Linear)


# ============================================================================ which modules
def linear_targets(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Names of the projections to quantize: every nn.Linear but MoE routers and the `skip`ped ones."""
    skip = set(skip)
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or name.endswith("router"):
            continue
        if name == "lm_head" and "lm_head" in skip:
            continue
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        out.append(name)
    return out


def split_moe_experts(model: nn.Module) -> None:
    """Give each MoE layer per-expert `nn.Linear`s (`fc_experts`, `proj_experts`) instead of stacked
    tensors, so experts are quantized one by one like any other projection."""
    for m in model.modules():
        if hasattr(m, "w_fc") and hasattr(m, "split_experts"):
            m.split_experts()


# ============================================================================ calibration
@contextmanager
def capture_inputs(model: nn.Module, names: list[str], fn) -> Iterable[None]:
    """While active, `fn(name, x [M, in])` sees every input to the named modules."""
    hooks = []
    for name in names:
        mod = model.get_submodule(name)
        hooks.append(mod.register_forward_pre_hook(lambda _m, args, n=name: fn(n, args[0].detach())))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def run_calibration(model: nn.Module, batches: list[Tensor]) -> None:
    with torch.inference_mode(False), torch.no_grad():
        for ids in batches:
            model(ids.to(model.device))


# ============================================================================ GPTQ
def gptq(w: Tensor, H: Tensor, spec: QuantSpec, block_size: int = 128, damp: float = 0.01,
         act_order: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ (Frantar et al., 2023): quantize columns one at a time, spreading each column's error over
    the not-yet-quantized ones through the inverse Hessian H = 2 X^T X / n (Cholesky form), with
    lazy block updates, damping and act-order. Groups use static params (computed on the original W,
    so act-order and groups combine). Returns RTN-format (codes [N, Kp], scales, zeros)."""
    N, K = w.shape
    W = w.detach().float().clone()
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    _, scale, zero = spec.grid(W)  # static group params [N, G]
    g = spec.group_size or spec.padded_in(K)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper Cholesky of H^-1
    Q = torch.zeros_like(W)
    groups = perm // g  # group of each (permuted) column
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, d = W1[:, i], Hinv1[i, i]
            gi = groups[i1 + i]
            q = spec.quantize(col[:, None], scale[:, gi], zero[:, gi])[:, 0]
            Q[:, i1 + i] = q
            err = (col - (q - zero[:, gi]) * scale[:, gi]) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    codes = torch.zeros(N, spec.padded_in(K))
    codes[:, :K] = Q[:, torch.argsort(perm)]
    if spec.padded_in(K) > K:  # padding columns hold zero weights
        pad_cols = torch.arange(K, spec.padded_in(K))
        codes[:, pad_cols] = spec.quantize(torch.zeros(N, len(pad_cols)), scale[:, -1], zero[:, -1])
    return codes, scale, zero


# ============================================================================ AWQ
def awq_scale(w: Tensor, x: Tensor, spec: QuantSpec, grid: int = 20,
              loss: Callable[[Tensor], float] | None = None, duo: bool = True) -> Tensor:
    """AWQ (Lin et al., 2024): a per-input-channel scale s, quantizing Q(W diag(s)) (x / s). Candidates:
    the paper's s = mean|x|^a and (`duo`, AutoAWQ's) s = mean|x|^a / mean|W_hat|^(1-a), W_hat = |W| over
    its group's max, a on a grid in [0, 1); the one with the lowest `loss(W_eff)` wins, W_eff =
    Q(W diag(s)) / s the weight the quantized layer applies. `loss` defaults to this layer's output
    error ||x W^T - x W_eff^T||^2 on the calibration inputs x [M, in]; `quantize_model` passes the
    error of the module the layer feeds (attention or MLP output). Returns s [in] (a = 0: all ones)."""
    w = w.detach().float()
    x = x.float()
    if loss is None:
        ref = x @ w.t()

        def loss(w_eff: Tensor) -> float:
            return (x @ w_eff.t() - ref).pow(2).mean().item()

    act = x.abs().mean(0).clamp(min=1e-8)  # [in]
    N, K = w.shape
    Kp = spec.padded_in(K)
    g = spec.group_size or Kp
    wg = F.pad(w.abs(), (0, Kp - K)).view(N, Kp // g, g)
    w_mean = (wg / (wg.amax(-1, keepdim=True) + 1e-6)).view(N, Kp)[:, :K].mean(0)  # [in]
    best, best_s = float("inf"), torch.ones_like(act)
    for family in ("paper", "duo") if duo else ("paper",):
        for i in range(grid):
            alpha = i / grid
            s = act.pow(alpha) if family == "paper" else act.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            err = loss(spec.fake(w * s) / s)
            if err < best:
                best, best_s = err, s
    return best_s


def awq_clip(w: Tensor, x: Tensor, spec: QuantSpec, grid: int = 20, min_ratio: float = 0.5,
             max_tokens: int = 4096) -> Tensor:
    """AWQ's clipping search: per (output row, group) a range shrink factor in [min_ratio, 1] for the
    grid. Coordinate descent on the layer's real output error ||x W^T - x Q(W)^T||^2 per row (inputs x
    [M, in], at most `max_tokens` of them): group by group, each takes the factor that minimises the
    row's whole error given the others' current factors. Starting from 1 (RTN), every step keeps or
    lowers the error, so the result is never worse than RTN on x. Returns [N, G]."""
    w = w.detach().float()
    x = x.float()[:: max(1, -(-x.shape[0] // max_tokens))]
    N, K = w.shape
    Kp = spec.padded_in(K)
    g = spec.group_size or Kp
    G = Kp // g
    xg = F.pad(x, (0, Kp - K)).view(-1, G, g)  # [M, G, g]
    ratios = torch.tensor([1 - (1 - min_ratio) * i / grid for i in range(grid + 1)])
    best = torch.zeros(N, G, dtype=torch.long)  # index into ratios (0 = no clipping)
    for n0 in range(0, N, 256):  # rows are independent: bounded memory
        wc = w[n0 : n0 + 256]
        n = wc.shape[0]
        # d [R, n, G, g]: every group's rounding error at every shrink ratio
        d = torch.stack([F.pad(wc - spec.fake(wc, r), (0, Kp - K)).view(n, G, g) for r in ratios])
        contrib = torch.einsum("mgk,ngk->gmn", xg, d[0])  # [G, M, n]: each group's part of the output error
        total = contrib.sum(0)  # [M, n]
        pick = best[n0 : n0 + n]
        for gi in range(G):
            rest = total - contrib[gi]
            cand = torch.einsum("mk,rnk->rmn", xg[:, gi], d[:, :, gi])  # [R, M, n]
            err = (rest[None] + cand).pow(2).sum(1)  # [R, n]
            new = err.argmin(0)  # the current factor is a candidate: never worse
            pick[:, gi] = new
            contrib[gi] = cand.gather(0, new[None, None].expand(1, cand.shape[1], n))[0]
            total = rest + contrib[gi]
    return ratios[best]


# ============================================================================ SmoothQuant + KL
def smooth_factors(act_absmax: Tensor, w: Tensor, alpha: float = 0.5) -> Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j."""
    w_max = w.detach().float().abs().amax(0).clamp(min=1e-5)
    return (act_absmax.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def kl_threshold(hist: Tensor, bin_width: float, levels: int = 128) -> float:
    """The clipping threshold of |x| whose `levels`-level quantization keeps the distribution closest in
    KL divergence to the calibration histogram (TensorRT's entropy calibration, Migacz 2017)."""
    hist = hist.double()
    n = hist.numel()
    best, best_i = float("inf"), n
    for i in range(levels, n + 1, max(1, (n - levels) // 64)):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()  # clipped mass lands in the last bin
        chunks = torch.tensor_split(hist[:i], levels)
        q = torch.cat([
            torch.where(c > 0, c.sum() / (c > 0).sum().clamp(min=1), torch.zeros_like(c)) for c in chunks
        ])
        p, q = p / p.sum(), q / q.sum().clamp(min=1e-12)
        mask = p > 0
        kl = float((p[mask] * (p[mask] / q[mask].clamp(min=1e-12)).log()).sum())
        if kl < best:
            best, best_i = kl, i
    return best_i * bin_width


# ============================================================================ the driver
def quantize_model(
    model: nn.Module,
    dtype: torch.dtype | str = torch.int8,
    group_size: int | None = 64,
    method: str = "rtn",
    calibration: Tensor | list | None = None,
    skip: Iterable[str] = (),
    embeddings: bool = True,
    act_order: bool = True,
    damp: float = 0.01,
    smooth_alpha: float = 0.5,
    act_calib: str = "dynamic",
    progress: bool = False,
) -> nn.Module:
    """Quantize `model`'s projections in place (see `Transformer.quantize`); returns the model."""
    method = method.lower()
    if method not in ("rtn", "gptq", "awq", "w8a8"):
        raise ConfigError(f"method must be rtn, gptq, awq or w8a8, got {method!r}")
    spec = spec_for("int8" if method == "w8a8" else dtype, 0 if method == "w8a8" else group_size)
    if act_calib not in ("dynamic", "kl"):
        raise ConfigError(f"act_calib must be 'dynamic' or 'kl', got {act_calib!r}")
    batches = calibration_batches(model, calibration)
    if method != "rtn" and not batches:
        raise InputError(f"method {method!r} needs calibration data: token ids [n, seq] (calibration=...)")
    if any(isinstance(m, QUANT_KINDS) for m in model.modules()):
        raise InputError("the model is already quantized")
    model.eval()
    # plain nn.Linear while calibrating: AWQ scores candidate weights by swapping them in (`_output_loss`),
    # and a PackedLinear's packed copy (keyed on the weight's version and address) could outlive them
    set_decode_packing(model, False)
    split_moe_experts(model)
    skip = tuple(skip)
    modules = [n for n, _ in model.named_modules()]
    for s in skip:
        if s not in ("embeddings", "lm_head") and not any(n == s or n.startswith(s + ".") for n in modules):
            raise InputError(f"skip={s!r}: expected 'embeddings', 'lm_head' or a module name or prefix of the model "
                             f"(e.g. {modules[1]!r})")
    names = linear_targets(model, skip)
    entries: dict[str, dict] = {}
    order = sequential_groups(model, names) if method in ("gptq", "awq") else [names]
    it = order
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(order, desc=f"quantize ({method})", unit="layer")
    for group in it:
        stats = _collect(model, group, batches, method, act_calib) if batches and method != "rtn" else {}
        for name in group:
            lin = model.get_submodule(name)
            new, entry = _quantize_linear(lin, spec, method, stats.get(name), act_order, damp, smooth_alpha,
                                          act_calib)
            model.set_submodule(name, new)
            entries[name] = entry
    if embeddings and "embeddings" not in set(skip) and isinstance(getattr(model, "wte", None), nn.Embedding):
        model.wte = Int8Embedding.from_float(model.wte.weight)
        entries["wte"] = {"kind": "int8_embedding"}
    model.quantization = {
        "method": method, "dtype": f"int{spec.bits}", "group_size": spec.group_size, "modules": entries,
    }
    if hasattr(model, "config") and model.config.tie_embeddings and ("lm_head" in entries or "wte" in entries):
        model.config = dataclasses.replace(model.config, tie_embeddings=False)  # a copy: configs may be shared
    return model


def calibration_batches(model: nn.Module, calibration) -> list[Tensor]:
    if calibration is None:
        return []
    if isinstance(calibration, Tensor):
        ids = calibration.long()
        if ids.dim() == 1:
            ids = ids[None]
        rows = list(ids)
    else:
        rows = [torch.as_tensor(r, dtype=torch.long) for r in calibration]
    if not rows or any(r.numel() == 0 for r in rows):
        raise InputError("calibration data is empty: expected token ids [n, seq] or a list of id lists")
    vocab = model.config.vocab_size
    for r in rows:
        if int(r.min()) < 0 or int(r.max()) >= vocab:
            raise InputError(f"calibration token ids must be in [0, {vocab})")
    return [r[None] for r in rows]  # one sequence per forward (lengths may differ)


def sequential_groups(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Targets grouped by transformer block, in depth order: a block is calibrated with all earlier
    blocks already quantized (GPTQ's sequential mode)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:2]) if parts[0] == "blocks" else n
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def _collect(model: nn.Module, names: list[str], batches: list[Tensor], method: str, act_calib: str) -> dict:
    """Per target: GPTQ Hessian, AWQ input sample (and the inputs of the module it feeds), SmoothQuant
    abs-max and KL histogram."""
    stats: dict[str, dict] = {n: {} for n in names}

    def see(name: str, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        s = stats[name]
        if method == "gptq":
            s["H"] = s.get("H", 0) + 2 * x.t() @ x
            s["n"] = s.get("n", 0) + x.shape[0]
        elif method == "awq":
            s.setdefault("x", []).append(x[:: max(1, x.shape[0] // 512)])  # a bounded sample
        elif method == "w8a8":
            am = x.abs().amax(0)
            s["absmax"] = torch.maximum(s["absmax"], am) if "absmax" in s else am
            if act_calib == "kl":
                s.setdefault("x", []).append(x)

    with capture_inputs(model, names, see), _capture_parents(model, names if method == "awq" else [], stats):
        run_calibration(model, batches)
    for s in stats.values():
        if "H" in s:
            s["H"] = s["H"] / s["n"]
        if "x" in s:
            s["x"] = torch.cat(s["x"])
    return stats


@contextmanager
def _capture_parents(model: nn.Module, names: list[str], stats: dict) -> Iterable[None]:
    """For AWQ: when a target's input is also the input of its parent module (q/k/v -> attention,
    gate/up -> MLP), record the parent's calls (stats[name]["parent"] = (module, [(args, kwargs)]))
    so that the scale search can score the parent's output, as AutoAWQ does."""
    hooks, calls, last = [], {}, {}
    for name in names:
        pname = name.rpartition(".")[0]
        parent = model.get_submodule(pname) if pname else None
        if parent is None or isinstance(parent, (nn.ModuleList, nn.ModuleDict)):
            continue
        if pname not in calls:
            calls[pname] = []

            def on_parent(_m, args, kwargs, p=pname):
                last[p] = args[0] if args else None
                calls[p].append((args, kwargs))

            hooks.append(parent.register_forward_pre_hook(on_parent, with_kwargs=True))

        def on_target(_m, args, n=name, p=pname):
            if args and last.get(p) is args[0]:
                stats[n]["parent"] = (model.get_submodule(p), calls[p])

        hooks.append(model.get_submodule(name).register_forward_pre_hook(on_target))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _output_loss(parent: nn.Module, lin: nn.Linear, calls: list) -> Callable[[Tensor], float]:
    """loss(W) = squared error of `parent`'s outputs on its recorded calls with `lin`'s weight set to W."""
    with torch.no_grad():
        refs = [parent(*a, **k) for a, k in calls]

    def loss(w: Tensor) -> float:
        saved = lin.weight.data
        lin.weight.data = w.to(saved.dtype)
        try:
            with torch.no_grad():
                return sum((parent(*a, **k) - r).float().pow(2).sum().item() for (a, k), r in zip(calls, refs))
        finally:
            lin.weight.data = saved

    return loss


def _quantize_linear(lin: nn.Linear, spec: QuantSpec, method: str, stats: dict | None, act_order: bool,
                     damp: float, smooth_alpha: float, act_calib: str) -> tuple[nn.Module, dict]:
    w, b = lin.weight.detach().float(), lin.bias
    K = lin.in_features
    entry = {"kind": f"int{spec.bits}", "group_size": spec.group_size}
    stats = stats or {}
    if method == "w8a8":
        m = _w8a8(lin, stats, smooth_alpha, static=act_calib == "kl" and "x" in stats)
        return m, {"kind": "w8a8", "static": m.act_scale is not None}
    s_in = clip = None
    if method == "awq" and "x" in stats:
        parent, calls = stats.get("parent", (None, None))
        loss = _output_loss(parent, lin, calls) if parent is not None else None
        s_in = awq_scale(w, stats["x"], spec, loss=loss)
        w = w * s_in
        clip = awq_clip(w, stats["x"] / s_in, spec)  # q/k rows too (AutoAWQ skips them: worse here)
    if method == "gptq" and "H" in stats:
        q, scale, zero = gptq(w, stats["H"], spec, act_order=act_order, damp=damp)
    else:  # RTN (also experts no calibration token reached), AWQ with its clipping
        q, scale, zero = spec.grid(w, clip)
    if s_in is not None:
        entry["input_scale"] = True
    if spec.bits == 8:
        return Int8Linear.from_codes(q, scale, b, K, spec.group_size, s_in), entry
    return Int4Linear.from_codes(q, scale, zero, b, K, spec.group_size, s_in), entry


def _w8a8(lin: nn.Linear, stats: dict, alpha: float, static: bool) -> W8A8Linear:
    w = lin.weight.detach().float()
    smooth = smooth_factors(stats["absmax"], w, alpha) if "absmax" in stats else torch.ones(lin.in_features)
    q, scale, _ = QuantSpec(8, 0).grid(w * smooth)
    m = W8A8Linear(lin.in_features, lin.out_features, lin.bias is not None, static=static, device="meta")
    m.qweight, m.scales, m.smooth = q.to(torch.int8), scale[:, 0].contiguous(), smooth.contiguous()
    m.bias = None if lin.bias is None else lin.bias.detach().float().clone()
    if m.act_scale is not None:
        m.act_scale = _kl_act_scale(stats["x"] / smooth)
    return m


def _kl_act_scale(x: Tensor, bins: int = 2048) -> Tensor:
    a = x.abs().flatten()
    top = float(a.max().clamp(min=1e-8))
    hist = torch.histc(a, bins=bins, min=0, max=top)
    return torch.tensor(kl_threshold(hist, top / bins) / 127)


# ============================================================================ QAT
def prepare_qat(model: nn.Module, dtype: torch.dtype | str = "int4", group_size: int | None = 64,
                skip: Iterable[str] = ()) -> nn.Module:
    """Swap the target nn.Linears for `FakeQuantLinear`s (same parameters, same state dict)."""
    spec = spec_for(dtype, group_size)
    split_moe_experts(model)
    for name in linear_targets(model, skip):
        lin = model.get_submodule(name)
        if isinstance(lin, FakeQuantLinear):
            continue
        lin.__class__ = FakeQuantLinear
        lin.spec = spec
    model.qat = {"dtype": f"int{spec.bits}", "group_size": spec.group_size}
    return model


# ============================================================================ loading
def build_quantized(model: nn.Module, quantization: dict) -> None:
    """Swap empty quantized kinds into a (meta-device) model as config.json's `quantization` lists them,
    so `load_state_dict` can fill them."""
    split_moe_experts(model)
    for name, e in quantization["modules"].items():
        kind = e.get("kind")
        if kind == "int8_embedding":
            emb = model.get_submodule(name)
            model.set_submodule(name, Int8Embedding(emb.num_embeddings, emb.embedding_dim, device="meta"))
            continue
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"quantization lists {name!r}, which is not a Linear of this model")
        K, N, bias = lin.in_features, lin.out_features, lin.bias is not None
        if kind == "int8":
            new = Int8Linear(K, N, bias, e.get("group_size", 0), e.get("input_scale", False), device="meta")
        elif kind == "int4":
            new = Int4Linear(K, N, bias, e.get("group_size", 64), e.get("input_scale", False), device="meta")
        elif kind == "w8a8":
            new = W8A8Linear(K, N, bias, e.get("static", False), device="meta")
        else:
            raise ConfigError(f"unknown quantized kind {kind!r} for {name!r}; expected int8, int4 or w8a8")
        model.set_submodule(name, new)
    model.quantization = quantization


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (what the model holds in memory)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def count_weights(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Weight elements of a quantized model: float parameters plus each quantized kind's [out, in]."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, QUANT_KINDS):
            n += m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
        elif isinstance(m, Int8Embedding):
            n += 0 if exclude_embeddings else m.num_embeddings * m.embedding_dim
        else:
            for p in m.parameters(recurse=False):
                if exclude_embeddings and name in ("wte", "wpe"):
                    continue
                n += p.numel()
    return n
