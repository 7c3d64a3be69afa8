"""LoRA (Hu et al., 2021): a frozen projection plus a trainable low-rank update, y = W x + s * B A x.

`LoRALinear` is a kind of Linear: it wraps the model's projection (`base`, any module mapping
[..., in] -> [..., out]) and is swapped in with `set_submodule`, so the model's forward is
unchanged. llmkit fuses q/k/v into one projection and SwiGLU's gate/up into another; a wrapped
projection is therefore split into named *parts* (q, k, v / gate, up), each with its own A and B,
exactly as PEFT puts one adapter on each of Hugging Face's separate q_proj, k_proj, ... modules.

Several named adapters can live side by side (multi-LoRA serving). `active` selects what runs:
one adapter name for the whole batch, None for the base model, or per-token routing
(`route_tokens`) where each row of a batch uses its own adapter.

Scaling s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import ConfigError
from llmkit.model.linear import PackedLinear, dense_linear

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # all-linear
EMBED = "embed"  # the token embedding (PEFT's embed_tokens target); not part of all-linear


@dataclass
class LoRAConfig:
    """What to adapt and how: rank, alpha, dropout, rsLoRA scaling, target projections."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    use_rslora: bool = False

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        if self.r < 1:
            raise ConfigError(f"LoRA rank r={self.r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout={self.dropout} must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def parse_targets(targets: str | list[str]) -> list[str]:
    """`all-linear` or a comma list of q,k,v,o,gate,up,down, plus `embed` (HF names like q_proj and
    embed_tokens are accepted)."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    out: list[str] = []
    for t in targets:
        t = t.removesuffix("_proj").removesuffix("_tokens")
        if t in ("all-linear", "all_linear", "all"):
            out += TARGETS
        elif t in TARGETS or t == EMBED:
            out.append(t)
        else:
            raise ConfigError(f"unknown LoRA target {t!r}; expected all-linear or some of "
                              f"{','.join(TARGETS)},{EMBED}")
    if not out:
        raise ConfigError("no LoRA targets given; expected all-linear or some of q,k,v,o,gate,up,down")
    return [t for t in (*TARGETS, EMBED) if t in out]


class LoRAAdapter(nn.Module):
    """One adapter on one projection: for each targeted part p, A_p [r, in] and B_p [out_p, r]."""

    def __init__(self, in_features: int, parts: dict[str, int], r: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.r, self.scale = r, scale
        self.lora_A = nn.ParameterDict({p: nn.Parameter(torch.empty(r, in_features)) for p in parts})
        self.lora_B = nn.ParameterDict({p: nn.Parameter(torch.zeros(n, r)) for p, n in parts.items()})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for a in self.lora_A.values():  # PEFT's default: A ~ kaiming-uniform, B = 0 (the update starts at 0)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def add_to(self, y: torch.Tensor, x: torch.Tensor, layout: list[tuple[str, int]]) -> torch.Tensor:
        """y + s * B A x for y [..., out] = base(x), x [..., in]: each part's B product is accumulated into
        its slice of y in place (one GEMM each, scale folded in; no concatenation, no extra pass)."""
        names = [p for p, _ in layout if p in self.lora_A]
        A = self.lora_A[names[0]] if len(names) == 1 else torch.cat([self.lora_A[p] for p in names])
        z = F.linear(self.dropout(x), A.to(x.dtype))  # [..., P * r]
        y = y if y.is_contiguous() else y.contiguous()
        y2, z2 = y.view(-1, y.shape[-1]), z.reshape(-1, z.shape[-1])  # [M, out], [M, P * r]
        zs = dict(zip(names, z2.split(self.r, dim=-1)))
        start = 0
        for p, n in layout:
            if p in zs:
                y2[:, start : start + n].addmm_(zs[p], self.lora_B[p].to(x.dtype).t(), alpha=self.scale)
            start += n
        return y

    def weight_delta(self, layout: list[tuple[str, int]]) -> torch.Tensor:
        """The update as a dense [out, in] matrix (for merging)."""
        in_features = next(iter(self.lora_A.values())).shape[1]
        rows = [self.scale * self.lora_B[p] @ self.lora_A[p] if p in self.lora_A
                else self.lora_B[next(iter(self.lora_B))].new_zeros(n, in_features) for p, n in layout]
        return torch.cat(rows, 0)


class LoRAFunction(torch.autograd.Function):
    """y = x W^T + b + s * [B_p A_p drop(x)]_p on a dense base, forward and backward by hand (training).

    Against autograd over `add_to`: the B products accumulate into y's slices with no copy-on-write
    of y in the backward, the dropout mask is one bool per input (kept; drop(x) is saved for dA), and
    the base's products go through oneDNN on CPU (`dense_linear`). x [M, in]; A [P r, in] (the parts'
    A stacked); B_p [n_p, r] for the parts at `slices` [(start, n_p)] of the output.
    """

    @staticmethod
    def forward(ctx, x, w, bias, A, p: float, scale: float, slices: list, *Bs):
        r = A.shape[0] // len(Bs)
        y = dense_linear(x, w, bias)  # [M, out]
        mask = torch.rand_like(x) >= p if p > 0 else None  # keep with probability 1 - p
        xd = x * mask * (1.0 / (1.0 - p)) if mask is not None else x
        z = dense_linear(xd, A)  # [M, P r]
        for i, ((start, n), B) in enumerate(zip(slices, Bs)):
            y[:, start : start + n].addmm_(z[:, i * r : (i + 1) * r], B.t(), alpha=scale)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w, xd, z, A, mask, *Bs)
        ctx.p, ctx.scale, ctx.slices = p, scale, slices
        return y

    @staticmethod
    def backward(ctx, dy):  # dy [M, out]
        x, w, xd, z, A, mask, *Bs = ctx.saved_tensors
        s, r = ctx.scale, A.shape[0] // len(Bs)
        dzs, dBs = [], []
        for i, ((start, n), B) in enumerate(zip(ctx.slices, Bs)):
            dy_p = dy[:, start : start + n]  # [M, n_p]
            dBs.append(torch.mm(dy_p.t(), z[:, i * r : (i + 1) * r]).mul_(s))  # [n_p, r]
            dzs.append(torch.mm(dy_p, B))  # [M, r]
        dz = torch.cat(dzs, 1).mul_(s)  # [M, P r]
        dA = torch.mm(dz.t(), xd)  # [P r, in]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dxd = torch.mm(dz, A)  # [M, in]
            if mask is not None:
                dxd.mul_(mask).mul_(1.0 / (1.0 - ctx.p))
            dx = dense_linear(dy, w.t()).add_(dxd)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(dy.t(), x)
        if ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db, dA, None, None, None, *dBs


class LoRALinear(nn.Module):
    """base(x) + the active adapter's update. `layout` names the output slices [(part, size), ...].
    `base` may be a quantized kind (QLoRA): it stays frozen and gradients pass through it to x."""

    def __init__(self, base: nn.Module, layout: list[tuple[str, int]]) -> None:
        super().__init__()
        self.base = base
        self.quantized = hasattr(base, "weight_float")
        self.layout = layout
        self.in_features = base.in_features
        self.out_features = sum(n for _, n in layout)
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.routing: tuple[torch.Tensor, list[str | None]] | None = None  # (adapter index per token, names)

    @property
    def weight(self) -> torch.Tensor:  # the base weight, for code that reads dtype/device from it
        return self.base.weight

    def add_adapter(self, name: str, parts: list[str], r: int, scale: float, dropout: float) -> LoRAAdapter:
        sizes = dict(self.layout)
        w = next(self.base.buffers()) if self.quantized else self.base.weight  # quantized: float32 adapters
        ad = LoRAAdapter(self.in_features, {p: sizes[p] for p in parts}, r, scale, dropout)
        self.adapters[name] = ad.to(device=w.device, dtype=w.dtype if w.is_floating_point() and
                                    not self.quantized else None)
        return ad

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if (self.routing is None and self.active in self.adapters and torch.is_grad_enabled()
                and type(self.base) in (nn.Linear, PackedLinear) and not torch.is_autocast_enabled(x.device.type)
                and x.dtype == self.base.weight.dtype == self.adapters[self.active].lora_A[
                    next(iter(self.adapters[self.active].lora_A))].dtype):
            return self._by_hand(x)
        y = self.base(x)
        if self.routing is not None:
            index, names = self.routing  # index: [...] like x without its last dim; -1 = base model
            y = y.clone()
            for k in index.unique().tolist():
                if k < 0 or names[k] not in self.adapters:
                    continue
                sel = index == k
                y[sel] = self.adapters[names[k]].add_to(y[sel], x[sel], self.layout)
            return y
        if self.active is None or self.active not in self.adapters:
            return y
        return self.adapters[self.active].add_to(y, x, self.layout)

    def _by_hand(self, x: torch.Tensor) -> torch.Tensor | None:
        """Training through a dense base: the adapter's forward and backward in one `LoRAFunction`."""
        ad = self.adapters[self.active]
        names = [p for p, _ in self.layout if p in ad.lora_A]
        slices, start = {}, 0
        for p, n in self.layout:
            slices[p] = (start, n)
            start += n
        A = ad.lora_A[names[0]] if len(names) == 1 else torch.cat([ad.lora_A[p] for p in names])
        p = ad.dropout.p if isinstance(ad.dropout, nn.Dropout) and ad.dropout.training else 0.0
        base = self.base
        y = LoRAFunction.apply(x.reshape(-1, self.in_features), base.weight, base.bias, A, p, ad.scale,
                               [slices[n] for n in names], *(ad.lora_B[n] for n in names))
        return y.view(*x.shape[:-1], self.out_features)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight includes the active adapter."""
        base = self.base
        if self.quantized:
            raise ConfigError("cannot merge a LoRA adapter into a quantized projection; merge it into the "
                              "float base model (llmkit lora merge --model FLOAT_BASE --adapter DIR)")
        lin = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            w = base.weight.float()
            if self.active is not None:
                w = w + self.adapters[self.active].weight_delta(self.layout).float()
            lin.weight.copy_(w)
            if base.bias is not None:
                lin.bias.copy_(base.bias)
        return lin


class LoRAEmbeddingAdapter(LoRAAdapter):
    """An adapter on the token embedding: E[ids] + s * A^T[ids] B^T with A [r, vocab] = 0 and
    B [dim, r] ~ N(0, 1) at the start (PEFT's lora_embedding_A / lora_embedding_B)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int, scale: float) -> None:
        nn.Module.__init__(self)
        self.r, self.scale = r, scale
        self.lora_A = nn.ParameterDict({EMBED: nn.Parameter(torch.zeros(r, num_embeddings))})
        self.lora_B = nn.ParameterDict({EMBED: nn.Parameter(torch.randn(embedding_dim, r))})

    def add_to(self, y: torch.Tensor, ids: torch.Tensor, layout: list[tuple[str, int]]) -> torch.Tensor:
        A, B = self.lora_A[EMBED], self.lora_B[EMBED]  # y [..., dim] = E[ids]
        return y + F.embedding(ids, A.t()) @ B.t() * self.scale

    def weight_delta(self, layout: list[tuple[str, int]]) -> torch.Tensor:  # [vocab, dim]
        return (self.scale * self.lora_B[EMBED] @ self.lora_A[EMBED]).t()


class LoRAEmbedding(LoRALinear):
    """The token embedding plus the active adapter's low-rank update (same routing as LoRALinear)."""

    def __init__(self, base: nn.Embedding) -> None:
        nn.Module.__init__(self)
        self.base, self.quantized = base, False
        self.layout = [(EMBED, base.embedding_dim)]
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.routing: tuple[torch.Tensor, list[str | None]] | None = None

    def add_adapter(self, name: str, parts: list[str], r: int, scale: float, dropout: float) -> LoRAAdapter:
        w = self.base.weight
        ad = LoRAEmbeddingAdapter(self.in_features, self.out_features, r, scale)
        self.adapters[name] = ad.to(device=w.device, dtype=w.dtype)
        return ad

    def merged(self) -> nn.Embedding:
        """A plain nn.Embedding whose table includes the active adapter (a tied head keeps the old one)."""
        w = self.base.weight.detach().float()
        if self.active is not None:
            w = w + self.adapters[self.active].weight_delta(self.layout).float()
        return nn.Embedding.from_pretrained(w.to(self.base.weight.dtype), freeze=False)


# ---------------------------------------------------------------------------- whole models


def projection_sites(model: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """Every adaptable projection of a Transformer: module path -> output layout [(part, size)].

    GPT-2's checkpoints keep q/k/v fused too (c_attn), so there the fused projection is one part.
    """
    cfg = model.config
    nh, nkv, hd, inter = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size
    sites: dict[str, list[tuple[str, int]]] = {}
    for i, blk in enumerate(model.blocks):
        b = f"blocks.{i}."
        if cfg.model_type == "gpt2":
            sites[b + "attn.qkv"] = [("qkv", (nh + 2 * nkv) * hd)]
        else:
            sites[b + "attn.qkv"] = [("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)]
        sites[b + "attn.proj"] = [("o", cfg.n_embd)]
        if hasattr(blk.mlp, "fc"):  # a dense MLP (MoE experts are not Linear modules)
            sites[b + "mlp.fc"] = [("gate", inter), ("up", inter)] if blk.mlp.swiglu else [("up", inter)]
            sites[b + "mlp.proj"] = [("down", cfg.n_embd)]
    if isinstance(getattr(model, "wte", None), nn.Embedding | LoRAEmbedding):
        sites["wte"] = [(EMBED, cfg.n_embd)]
    return sites


def _parts_for(layout: list[tuple[str, int]], targets: list[str]) -> list[str]:
    parts = []
    for p, _ in layout:
        if p == "qkv":  # GPT-2: one fused part, adapted when any of q, k, v is a target
            if any(t in targets for t in "qkv"):
                if not all(t in targets for t in "qkv"):
                    raise ConfigError("GPT-2 keeps q, k and v in one projection (c_attn): target all three or none")
                parts.append(p)
        elif p in targets:
            parts.append(p)
    return parts


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters loaded into `model`, in the order they were added."""
    names: dict[str, None] = {}
    for m in lora_modules(model).values():
        names.update(dict.fromkeys(m.adapters))
    return list(names)


def add_lora(model: nn.Module, cfg: LoRAConfig, name: str = "default") -> nn.Module:
    """Wrap the targeted projections of `model` in LoRALinear (once) and add adapter `name`; activate it."""
    added = 0
    for path, layout in projection_sites(model).items():
        parts = _parts_for(layout, cfg.targets)
        if not parts:
            continue
        mod = wrap_site(model, path, layout)
        mod.add_adapter(name, parts, cfg.r, cfg.scale, cfg.dropout)
        added += 1
    if not added:
        raise ConfigError(f"LoRA targets {','.join(cfg.targets)} match no projection of this model")
    set_active_adapter(model, name)
    return model


def wrap_site(model: nn.Module, path: str, layout: list[tuple[str, int]]) -> LoRALinear:
    """The LoRA module at `path`, swapped in for the plain projection (or embedding) the first time."""
    mod = model.get_submodule(path)
    if not isinstance(mod, LoRALinear):
        mod = LoRAEmbedding(mod) if layout[0][0] == EMBED else LoRALinear(mod, layout)
        model.set_submodule(path, mod)
    return mod


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Run every LoRA projection with adapter `name` (None = the base model)."""
    for m in lora_modules(model).values():
        m.active, m.routing = name, None


def route_tokens(model: nn.Module, index: torch.Tensor | None, names: list[str | None]) -> None:
    """Per-token adapters: token t uses adapter names[index[t]] (index -1 = base). None clears it."""
    for m in lora_modules(model).values():
        m.routing = None if index is None else (index, names)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the weights; every LoRALinear becomes a plain nn.Linear again.
    An adapted embedding unties a tied LM head (the head keeps the base table, as unmerged)."""
    for path, m in lora_modules(model).items():
        if isinstance(m, LoRAEmbedding) and m.active is not None and model.config.tie_embeddings:
            model.lm_head.weight = nn.Parameter(m.base.weight.detach().clone())
            model.config.tie_embeddings = False
        model.set_submodule(path, m.merged())
    return model


def lora_parameters(model: nn.Module, name: str = "default") -> dict[str, nn.Parameter]:
    """The adapter's parameters by module name: {'blocks.0.attn.qkv.adapters.default.lora_A.q': ...}."""
    return {n: p for n, p in model.named_parameters() if f".adapters.{name}." in n}

