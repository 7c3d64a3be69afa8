"""Pruning: unstructured (magnitude, Wanda, SparseGPT), 2:4 semi-structured, and structured (attention
heads, MLP channels, whole blocks).

Each method zeroes weights of the block projections in place; the model stays a dense model with
zeros, so a pruned folder is a normal Hugging Face folder (load_model, generate, serve, quantize and
transformers read it unchanged). The LM head and token embeddings are kept (as in Wanda/SparseGPT).
- magnitude: the smallest |W| of each layer (layer-wise threshold; a fused llmkit projection, e.g.
  [q; k; v] or [gate; up], counts as the Hugging Face Linears it holds, as in the papers' baselines);
- Wanda (Sun et al., 2024): score |W_ij| * ||X_j||_2 from calibration inputs, the lowest scores of
  each output row;
- SparseGPT (Frantar & Alistarh, 2023): per block of 128 columns, mask by w^2 / [H^-1]_jj^2 (one
  threshold over the block's rows of each Linear, as the paper's code) and spread each pruned
  weight's error over the remaining columns through the inverse Hessian H = X^T X;
- 2:4: in every group of 4 consecutive inputs of a row, the 2 lowest scores are zeroed (Wanda
  scores with calibration data, |W| without).
Calibration reuses `llmkit.model.quant`'s capture hooks and sequential block order.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from llmkit.errors import ConfigError, InputError
from llmkit.model.quant import (
    QUANT_KINDS,
    calibration_batches,
    capture_inputs,
    linear_targets,
    run_calibration,
    sequential_groups,
)

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "2:4", "heads", "channels", "layers")


def lowest_mask(score: Tensor, k: int, dim: int | None = None) -> Tensor:
    """Boolean mask of exactly `k` lowest scores (over the whole tensor, or per row along `dim`)."""
    if dim is None:
        idx = torch.argsort(score.flatten(), stable=True)[:k]
        mask = torch.zeros(score.numel(), dtype=torch.bool)
        mask[idx] = True
        return mask.view_as(score)
    idx = torch.argsort(score, dim=dim, stable=True).narrow(dim, 0, k)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(dim, idx, True)


def n_m_mask(score: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Mask of the `n` lowest scores in every group of `m` consecutive inputs of each row: [out, in]."""
    out, k = score.shape
    if k % m:
        raise InputError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {k}")
    return lowest_mask(score.reshape(out, k // m, m), n, dim=2).view(out, k)


def wanda_score(w: Tensor, x_norm: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2: w [out, in], x_norm [in] (the L2 norm of input feature j over all tokens)."""
    return w.abs() * x_norm[None, :]


def parts_mask(score: Tensor, sparsity: float, parts: list[int] | None = None) -> Tensor:
    """Mask of the `round(sparsity * numel)` lowest scores of each row band `parts` (row counts; the
    Linears a fused projection holds), i.e. one layer-wise threshold per Linear."""
    bands = score.split(parts or [score.shape[0]], 0)
    return torch.cat([lowest_mask(b, int(round(sparsity * b.numel()))) for b in bands])


def hf_parts(model: nn.Module, name: str) -> list[int]:
    """Output-row counts of the Hugging Face Linears that llmkit fuses into `name` ([q; k; v],
    [gate; up]), from the family's conversion rules; one part when it is one Linear there."""
    from llmkit.model.families import get_family

    cfg, w = model.config, model.get_submodule(name).weight
    if cfg.model_type != "llmkit":  # llmkit's own format: its layers are the Linears
        fam = get_family(cfg.model_type)
        for ours, _hf, op, sizes in fam.rules(cfg, fam.load_prefixes[0], False):
            if ours == name + ".weight" and op == "cat" and sum(sizes) == w.shape[0]:
                return list(sizes)
    return [w.shape[0]]


def sparsegpt(w: Tensor, H: Tensor, sparsity: float, n_m: tuple[int, int] | None = None,
              block_size: int = 128, damp: float = 0.01, parts: list[int] | None = None) -> Tensor:
    """SparseGPT: prune w [out, in] to `sparsity` (or n:m) with OBS updates through H^-1 (H = X^T X).
    Unstructured: per block of columns, the lowest w^2 / [H^-1]_jj^2 of each row band `parts` (the
    Linears of a fused projection; default the whole layer) go, as in the paper's code."""
    N, K = w.shape
    W = w.detach().float().clone()
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1), Hinv[i1:i2, i1:i2]
        score = W1**2 / torch.diag(Hinv1)[None] ** 2
        if n_m is None:  # this block's share of each Linear's pruned weights
            mask1 = parts_mask(score, sparsity, parts)
        else:
            mask1 = n_m_mask(score, *n_m)
        for i in range(i2 - i1):
            col, d = W1[:, i], Hinv1[i, i]
            q = col.masked_fill(mask1[:, i], 0)
            err = (col - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.masked_fill(mask, 0)


def zero_masks(model: nn.Module) -> dict[str, Tensor]:
    """{parameter: W != 0} of every block matrix holding zeros: the sparsity pattern a recovery
    finetune keeps (`keep_zeros`)."""
    return {n: p.detach() != 0 for n, p in model.named_parameters()
            if n.startswith("blocks.") and p.dim() == 2 and bool((p == 0).any())}


@torch.no_grad()
def keep_zeros(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Re-zero the masked-out weights (after an optimizer step) so the pruned pattern holds."""
    for n, p in model.named_parameters():
        if n in masks:
            p.mul_(masks[n].to(p.device))


def prune_targets(model: nn.Module) -> list[str]:
    """The projections that are pruned: every block nn.Linear but MoE routers (not the LM head)."""
    return [n for n in linear_targets(model, skip=("lm_head",)) if n.startswith("blocks.")]


@torch.no_grad()
def prune_model(model: nn.Module, method: str = "magnitude", sparsity: float = 0.5,
                calibration: Tensor | list | None = None, progress: bool = False) -> dict[str, float]:
    """Prune `model`'s block projections in place; returns each layer's fraction of zero weights.

    `method`: magnitude | wanda | sparsegpt | 2:4 (sparsity fixed at 0.5), or structured (a smaller
    dense model): heads (`prune_heads`), channels (`prune_channels`: MLP intermediate channels),
    layers (`prune_layers`: whole blocks). `calibration`: token ids [n, seq], needed by wanda,
    sparsegpt and layers (2:4, heads and channels use activations when given). Structured methods
    return {module: fraction removed}.
    """
    if method not in PRUNE_METHODS:
        raise ConfigError(f"prune method must be one of {', '.join(PRUNE_METHODS)}, got {method!r}")
    if method == "2:4":
        sparsity = 0.5
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    if any(isinstance(m, QUANT_KINDS) for m in model.modules()):
        raise InputError("prune a float model: this one is quantized (prune first, then quantize)")
    batches = calibration_batches(model, calibration)
    if method in ("wanda", "sparsegpt") and not batches:
        raise InputError(f"method {method!r} needs calibration data: token ids [n, seq] (--calib FILE)")
    model.eval()
    if method == "channels":
        return prune_channels(model, sparsity, batches)
    if method == "heads":
        return prune_heads(model, sparsity, batches)
    if method == "layers":
        if not batches:
            raise InputError("method 'layers' needs calibration data (block influence): token ids [n, seq] "
                             "(--calib FILE)")
        return prune_layers(model, sparsity, batches)
    names = prune_targets(model)
    order = sequential_groups(model, names) if batches else [names]
    if progress:
        from tqdm.auto import tqdm

        order = tqdm(order, desc=f"prune ({method})", unit="layer")
    out: dict[str, float] = {}
    for group in order:
        stats = _collect(model, group, batches, method) if batches else {}
        for name in group:
            lin = model.get_submodule(name)
            w = lin.weight.detach().float()
            k = int(round(sparsity * w.shape[1]))
            if method == "magnitude":
                w = w.masked_fill(parts_mask(w.abs(), sparsity, hf_parts(model, name)), 0)
            elif method == "wanda":
                w = w.masked_fill(lowest_mask(wanda_score(w, stats[name]["x_norm"]), k, dim=1), 0)
            elif method == "sparsegpt":
                w = sparsegpt(w, stats[name]["H"], sparsity, parts=hf_parts(model, name))
            else:  # 2:4
                score = wanda_score(w, stats[name]["x_norm"]) if name in stats else w.abs()
                w = w.masked_fill(n_m_mask(score), 0)
            lin.weight.copy_(w.to(lin.weight.dtype))
            out[name] = float((lin.weight == 0).float().mean())
    return out


def _collect(model: nn.Module, names: list[str], batches: list[Tensor], method: str) -> dict:
    """Per target: ||X_j||_2 over calibration tokens (Wanda, 2:4) or H = X^T X / n (SparseGPT)."""
    stats: dict[str, dict] = {n: {"sq": 0, "H": 0, "n": 0} for n in names}

    def see(name: str, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        s = stats[name]
        s["n"] += x.shape[0]
        if method == "sparsegpt":
            s["H"] = s["H"] + x.t() @ x
        else:
            s["sq"] = s["sq"] + (x * x).sum(0)

    with capture_inputs(model, names, see):
        run_calibration(model, batches)
    for s in stats.values():
        s["x_norm"] = torch.as_tensor(s["sq"]).sqrt()
        if method == "sparsegpt":
            s["H"] = s["H"] / max(s["n"], 1)
    return stats


@torch.no_grad()
def prune_channels(model: nn.Module, sparsity: float, batches: list[Tensor] | None = None) -> dict[str, float]:
    """Structured: drop `round(sparsity * intermediate_size)` channels of every block's MLP, giving a
    genuinely smaller dense model (config `intermediate_size` shrinks; the same count per block, as
    Hugging Face configs hold one size). Channel c's importance is ||X_c||_2 * ||W_proj[:, c]||_2 (the
    Wanda score summed over the output projection's column; X: its calibration inputs), or without
    calibration ||W_proj[:, c]|| * ||W_fc[c]|| (* ||W_up[c]|| for SwiGLU). Returns {mlp: fraction removed}."""
    import dataclasses

    from llmkit.model.transformer import MLP

    blocks = list(getattr(model, "blocks", []))
    if not blocks or not all(type(b.mlp) is MLP for b in blocks):
        raise InputError("channel pruning needs a decoder whose blocks all have a dense MLP (not MoE)")
    inter = model.config.intermediate_size
    keep = inter - int(round(sparsity * inter))
    if keep < 1:
        raise ConfigError(f"sparsity {sparsity} would remove every MLP channel")
    names = [f"blocks.{i}.mlp.proj" for i in range(len(blocks))]
    stats = _collect(model, names, batches, "wanda") if batches else {}
    out = {}
    for i, b in enumerate(blocks):
        mlp, name = b.mlp, names[i]
        proj, fc = mlp.proj.weight, mlp.fc.weight  # [C, inter], [inter or 2*inter, C]
        if name in stats:
            score = stats[name]["x_norm"] * proj.float().norm(dim=0)
        else:
            rows = fc.float().norm(dim=1)
            score = proj.float().norm(dim=0) * (rows[:inter] * rows[inter:] if mlp.swiglu else rows)
        idx = torch.sort(torch.topk(score, keep).indices).values  # kept channels, in order
        rows_idx = torch.cat([idx, idx + inter]) if mlp.swiglu else idx
        new_fc = nn.Linear(fc.shape[1], len(rows_idx), bias=mlp.fc.bias is not None, device=fc.device, dtype=fc.dtype)
        new_fc.weight.copy_(fc[rows_idx])
        if mlp.fc.bias is not None:
            new_fc.bias.copy_(mlp.fc.bias[rows_idx])
        new_proj = nn.Linear(keep, proj.shape[0], bias=mlp.proj.bias is not None, device=proj.device,
                             dtype=proj.dtype)
        new_proj.weight.copy_(proj[:, idx])
        if mlp.proj.bias is not None:
            new_proj.bias.copy_(mlp.proj.bias)
        mlp.fc, mlp.proj = new_fc, new_proj
        out[f"blocks.{i}.mlp"] = 1 - keep / inter
    model.config = dataclasses.replace(model.config, intermediate_size=keep)  # a copy: configs may be shared
    return out


def _new_linear(old: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A Linear holding the chosen output `rows` / input `cols` of `old`."""
    w = old.weight
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    b = old.bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if b is not None:
        new.bias.copy_(b[rows] if rows is not None else b)
    return new


@torch.no_grad()
def prune_heads(model: nn.Module, sparsity: float, batches: list[Tensor] | None = None) -> dict[str, float]:
    """Structured: remove attention heads, the same count in every layer (configs hold one n_head).

    Head h's importance in a layer is sum_c ||X_c||_2 * ||W_o[:, c]||_2 over its head_dim columns c of
    the output projection (X: the projection's calibration inputs, i.e. the heads' outputs), or without
    calibration ||W_o[:, h]||_F * ||W_q[h]||_F. MHA (n_kv_head = n_head): round(s * n_head) heads go with
    their keys and values; GQA/MQA: round(s * group) query heads of every KV group go (the KV heads
    stay, so each group keeps the same size). Families whose Hugging Face config cannot hold a
    head_dim other than n_embd / n_head (gpt2, phi3) are saved as model_type llmkit. Returns
    {attn: fraction of query heads removed}."""
    import dataclasses

    cfg = model.config
    blocks = list(getattr(model, "blocks", []))
    if not blocks:
        raise InputError("head pruning needs a decoder with blocks")
    if cfg.pos == "alibi":
        raise InputError("head pruning of ALiBi models is not supported (the slopes depend on the head count)")
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    g = nh // nkv
    mha = nkv == nh
    drop = int(round(sparsity * (nh if mha else g)))
    if drop >= (nh if mha else g):
        raise ConfigError(f"sparsity {sparsity} would remove every attention head"
                          + ("" if mha else " of a KV group"))
    names = [f"blocks.{i}.attn.proj" for i in range(len(blocks))]
    stats = _collect(model, names, batches, "wanda") if batches else {}
    out = {}
    new_nh, new_nkv = (nh - drop, nkv - drop) if mha else (nkv * (g - drop), nkv)
    for i, b in enumerate(blocks):
        attn = b.attn
        wo, wqkv = attn.proj.weight.float(), attn.qkv.weight.float()  # [C, nh*hd], [(nh+2nkv)*hd, C]
        if names[i] in stats:
            score = (stats[names[i]]["x_norm"] * wo.norm(dim=0)).view(nh, hd).sum(1)
        else:
            score = wo.view(-1, nh, hd).norm(dim=(0, 2)) * wqkv[: nh * hd].view(nh, hd, -1).norm(dim=(1, 2))
        if mha:
            q_keep = torch.sort(torch.topk(score, nh - drop).indices).values
            kv_keep = q_keep
        else:  # the best (g - drop) query heads of every group
            per = torch.topk(score.view(nkv, g), g - drop, dim=1).indices.sort(dim=1).values
            q_keep = (per + torch.arange(nkv)[:, None] * g).flatten()
            kv_keep = torch.arange(nkv)
        cols = (q_keep[:, None] * hd + torch.arange(hd)).flatten()
        k_rows = ((nh + kv_keep)[:, None] * hd + torch.arange(hd)).flatten()
        v_rows = ((nh + nkv + kv_keep)[:, None] * hd + torch.arange(hd)).flatten()
        attn.qkv = _new_linear(attn.qkv, rows=torch.cat([cols, k_rows, v_rows]))
        attn.proj = _new_linear(attn.proj, cols=cols)
        attn.n_head, attn.n_kv_head = new_nh, new_nkv
        out[f"blocks.{i}.attn"] = 1 - new_nh / nh
    new = dataclasses.replace(cfg, n_head=new_nh, n_kv_head=new_nkv, head_dim=hd)
    if cfg.model_type in ("gpt2", "phi3") and new_nh * hd != cfg.n_embd:
        new = dataclasses.replace(new, model_type="llmkit")  # their configs derive head_dim from n_embd
    model.config = new
    return out


@torch.no_grad()
def block_influence(model: nn.Module, batches: list[Tensor]) -> list[float]:
    """ShortGPT's Block Influence per block: 1 - mean over tokens of cos(block input, block output)."""
    sums = [0.0] * len(model.blocks)
    count = [0] * len(model.blocks)

    def hook(i):
        def fn(_m, args, out):
            x, y = args[0].float(), out.float()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)  # [B, T]
            sums[i] += float(cos.sum())
            count[i] += cos.numel()
        return fn

    hooks = [b.register_forward_hook(hook(i)) for i, b in enumerate(model.blocks)]
    try:
        run_calibration(model, batches)
    finally:
        for h in hooks:
            h.remove()
    return [1 - s / max(n, 1) for s, n in zip(sums, count, strict=True)]


@torch.no_grad()
def prune_layers(model: nn.Module, sparsity: float, batches: list[Tensor]) -> dict[str, float]:
    """Structured: remove the round(s * n_layer) blocks with the lowest Block Influence (ShortGPT, Men
    et al., 2024); config `n_layer` (and `layer_types`) shrink. Returns {removed block: its influence}."""
    import dataclasses

    cfg = model.config
    n = len(model.blocks)
    drop = int(round(sparsity * n))
    if drop >= n:
        raise ConfigError(f"sparsity {sparsity} would remove every block")
    bi = block_influence(model, batches)
    gone = sorted(sorted(range(n), key=lambda i: (bi[i], i))[:drop])
    keep = [i for i in range(n) if i not in gone]
    model.blocks = nn.ModuleList(model.blocks[i] for i in keep)
    for j, b in enumerate(model.blocks):
        b.attn.layer_idx = j  # the KV-cache slot
    types = [cfg.layer_types[i] for i in keep] if cfg.layer_types is not None else None
    model.config = dataclasses.replace(cfg, n_layer=len(keep), layer_types=types)
    return {f"blocks.{i}": bi[i] for i in gone}
