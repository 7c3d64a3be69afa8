"""The decoder-only Transformer behind every causal-LM family (GPT-2, Llama, Qwen2/3, Mistral, Mixtral,
Gemma 2/3, Phi-3).

One block = pre-norm attention + pre-norm MLP (dense SwiGLU/GELU or sparse MoE). q, k and v come
from one fused projection and SwiGLU's gate and up from another: fewer, larger matmuls are faster
in training and decoding alike; `hf.py` splits/concatenates them to and from Hugging Face names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import InputError
from llmkit.model import hf, kernels
from llmkit.model.attention import AttnMeta
from llmkit.model.config import ModelConfig
from llmkit.model.layers import ACTIVATIONS, add_norm, call, check_token_ids, embedding, make_norm
from llmkit.model.positions import (
    alibi_bias,
    alibi_slopes,
    apply_rope,
    rope_attention_factor,
    rope_cos_sin,
    rope_inv_freq,
    sinusoidal_table,
)
from llmkit.model.quant import count_weights, prepare_qat, quantize_model


class CausalSelfAttention(nn.Module):
    """Multi-head attention with grouped KV heads (MHA: n_kv_head = n_head, MQA: 1, else GQA).

    Config options: q/k RMSNorm per head before RoPE (`qk_norm`), a softmax scale other than
    1/sqrt(head_dim) (`attn_scale`), tanh soft-capping of the scores (`attn_softcap`, then the
    scores are computed here instead of by SDPA), a separate local RoPE for sliding layers.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.attn_out_bias)
        self.window = cfg.window_for_layer(layer_idx)
        self.local_rope = cfg.rope_local_theta is not None and self.window is not None
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, cfg.head_dim)
            self.k_norm = make_norm(cfg, cfg.head_dim)
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_softcap
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,  # [B, T, C]
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None,  # [B, 1, T, hd] each
        mask: torch.Tensor | None,  # [B, 1, T, S] bool (True = attend) or float (additive), None = causal
        kv_cache: Any = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        mods = self._modules  # (not nn.Module.__getattr__; `call`: not __call__ unless a hook needs it)
        h = call(mods["qkv"], x)  # [B, T, (nh + 2 nkv) hd]
        # a decode step: llmkit's C kernels (model/kernels.py)
        lib = kernels.decode_lib() if T == 1 and not torch.is_grad_enabled() and kernels.readable(h) else None
        if lib is not None and cos_sin is not None and mask is None and self.softcap is None and not self.qk_norm \
                and getattr(kv_cache, "fused_decode", False):  # on a static cache: one C call from qkv to y
            y = kernels.decode_attention_step(h, *cos_sin, kv_cache, self.layer_idx, nh, nkv, self.scale, lib)
            if y is not None:
                return call(mods["proj"], y)
        qkv = h.view(B, T, nh + 2 * nkv, hd).transpose(1, 2)  # [B, nh + 2 nkv, T, hd]
        qk, v = qkv[:, : nh + nkv], qkv[:, nh + nkv :]
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :nh]), self.k_norm(qk[:, nh:])], dim=1)
        if cos_sin is not None:
            rotated = kernels.rope1(qk, *cos_sin, lib) if lib is not None else None
            qk = rotated if rotated is not None else apply_rope(qk, *cos_sin)  # q and k heads rotated together
        q, k = qk[:, :nh], qk[:, nh:]  # [B, nh, T, hd], [B, nkv, T, hd]
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, nkv, S, hd]
        y = None
        if lib is not None and mask is None and self.softcap is None:  # (None for a layout it does not take)
            y = kernels.decode_attention(q, k, v, self.scale, lib)
        if y is None and self.softcap is not None:
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        elif y is None:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                is_causal=mask is None and T > 1,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=int(k.shape[1]) != nh,  # a cache may hand back keys already repeated per query head
                scale=self.scale,
            )  # [B, nh, T, hd]
        return call(mods["proj"], y.transpose(1, 2).reshape(B, T, nh * hd))


def softcapped_attention(q, k, v, mask, scale: float | None, cap: float) -> torch.Tensor:
    """softmax(cap * tanh(q k^T * scale / cap) + mask) v (Gemma 2); q [B,H,T,D], k/v [B,Hkv,S,D], mask bool."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)  # [B, H, T, S]
    scores = cap * torch.tanh(scores / cap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return F.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): down(act(gate(x)) * up(x)); or the classic fc -> act -> proj."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.act = ACTIVATIONS[cfg.activation]
        width = 2 * cfg.intermediate_size if self.swiglu else cfg.intermediate_size
        self.fc = nn.Linear(cfg.n_embd, width, bias=cfg.mlp_bias)  # SwiGLU: [gate; up] fused
        self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = self._modules  # (as in attention)
        h = call(mods["fc"], x)
        if self.swiglu and self.act is F.silu and not torch.is_grad_enabled() and h.numel() <= 1 << 16 \
                and kernels.readable(h) and (lib := kernels.decode_lib()) is not None:
            return call(mods["proj"], kernels.silu_mul(h, lib))  # a decode step's few rows: one C call
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return call(mods["proj"], self.act(gate) * up)
        return call(mods["proj"], self.act(h))


class MoE(nn.Module):
    """Sparse Mixture-of-Experts SwiGLU MLP with top-k routing (Shazeer et al., 2017; Mixtral).

    Each token goes to its k highest-scoring experts, mixed with the renormalised softmax weights.
    `stats` keeps what the Switch-Transformer load-balancing loss needs (Fedus et al., 2021).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, C, inter = cfg.n_expert, cfg.n_embd, cfg.intermediate_size
        self.n_expert, self.top_k = E, cfg.n_expert_per_tok
        self.act = ACTIVATIONS[cfg.activation]
        self.router = nn.Linear(C, E, bias=False)
        self.w_fc = nn.Parameter(torch.empty(E, 2 * inter, C))  # per expert [gate; up]
        self.w_proj = nn.Parameter(torch.empty(E, C, inter))
        # per-expert Linear kinds instead of the stacked tensors (after `split_experts`, e.g. quantized)
        self.fc_experts: nn.ModuleList | None = None
        self.proj_experts: nn.ModuleList | None = None
        self.stats: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def split_experts(self) -> None:
        """Move the stacked expert weights into per-expert `nn.Linear`s (swappable like any projection)."""
        if self.fc_experts is not None:
            return
        E, I2, C = self.w_fc.shape
        fcs, projs = nn.ModuleList(), nn.ModuleList()
        for e in range(E):
            fc = nn.Linear(C, I2, bias=False, device=self.w_fc.device, dtype=self.w_fc.dtype)
            proj = nn.Linear(I2 // 2, C, bias=False, device=self.w_proj.device, dtype=self.w_proj.dtype)
            fc.weight, proj.weight = nn.Parameter(self.w_fc.data[e]), nn.Parameter(self.w_proj.data[e])
            fcs.append(fc)
            projs.append(proj)
        del self.w_fc, self.w_proj
        self.fc_experts, self.proj_experts = fcs, projs

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:  # [n, C] -> [n, C]
        if self.fc_experts is not None:
            gate, up = self.fc_experts[e](x).chunk(2, dim=-1)
            return self.proj_experts[e](self.act(gate) * up)
        gate, up = (x @ self.w_fc[e].T).chunk(2, dim=-1)
        return (self.act(gate) * up) @ self.w_proj[e].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        xf = x.reshape(-1, C)  # [N, C]
        probs = F.softmax(self.router(xf).float(), dim=-1)  # [N, E]
        top_w, top_i = probs.topk(self.top_k, dim=-1)  # [N, k]
        top_w = (top_w / top_w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(xf)
        counts = torch.bincount(top_i.flatten(), minlength=self.n_expert)
        for e in counts.nonzero().flatten().tolist():
            tok, slot = (top_i == e).nonzero(as_tuple=True)
            h = self._expert(e, xf[tok])
            out.index_add_(0, tok, h * top_w[tok, slot, None])
        self.stats = (counts.float(), probs.sum(0), xf.shape[0])
        return out.view(B, T, C)


class Block(nn.Module):
    """Pre-norm attention + pre-norm MLP; with `post_norms` each output is normed again before the
    residual add (Gemma 2/3: "sandwich" norms)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.n_expert > 0 else MLP(cfg)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:
            self.ln_attn_post = make_norm(cfg)
            self.ln_mlp_post = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout

    def forward(self, x, cos_sin, mask, kv_cache=None) -> torch.Tensor:
        mods = self._modules  # (as in attention)
        if isinstance(cos_sin, list):  # [global, local] RoPE
            cos_sin = cos_sin[1] if mods["attn"].local_rope else cos_sin[0]
        h = call(mods["attn"], call(mods["ln_1"], x), cos_sin, mask, kv_cache)
        if self.post_norms:
            h = self.ln_attn_post(h)
        x, h = add_norm(mods["ln_2"], x, self.drop(h) if self.dropout and self.training else h)  # x + h, ln_2(x + h)
        h = call(mods["mlp"], h)
        if self.post_norms:
            h = self.ln_mlp_post(h)
        return x + (self.drop(h) if self.dropout and self.training else h)


class Transformer(nn.Module):
    """Decoder-only language model: `model(input_ids) -> logits [B, T, vocab]`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cfg = self.config = config
        if cfg.model_type == "bert":
            raise InputError("model_type 'bert' is an encoder: build llmkit.model.bert.BertModel instead")
        self.wte = embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.check_inputs = True  # range-check token ids each forward (one tiny host sync)
        self.aux_loss = torch.zeros(())
        self.init_buffers()
        if self.wte.weight.device.type != "meta":
            self.apply(self._init_weights)

    # ------------------------------------------------------------------ set-up
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-learned tables: RoPE frequencies, ALiBi slopes, sinusoids."""
        cfg = self.config
        device = torch.device(device) if device is not None else self.wte.weight.device
        with torch.device("cpu"):  # also when built under a meta-device context (the loader)
            inv_freq = rope_inv_freq(cfg) if cfg.pos == "rope" else None
            local = rope_inv_freq(cfg, local=True) if cfg.pos == "rope" and cfg.rope_local_theta else None
            slopes = alibi_slopes(cfg.n_head) if cfg.pos == "alibi" else None
            pe = sinusoidal_table(cfg.block_size, cfg.n_embd) if cfg.pos == "sinusoidal" else None
        for name, t in (("inv_freq", inv_freq), ("inv_freq_local", local), ("alibi_slopes", slopes), ("pe", pe)):
            self.register_buffer(name, None if t is None or device.type == "meta" else t.to(device), False)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, MoE) and module.fc_experts is None:
            nn.init.normal_(module.w_fc, 0.0, std)
            nn.init.normal_(module.w_proj, 0.0, std / math.sqrt(2 * self.config.n_layer))
        if isinstance(module, Block):  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            nn.init.normal_(module.attn.proj.weight, 0.0, std / math.sqrt(2 * self.config.n_layer))
            if isinstance(module.mlp, MLP):
                nn.init.normal_(module.mlp.proj.weight, 0.0, std / math.sqrt(2 * self.config.n_layer))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the float model (a quantized model counts its weights' elements)."""
        if getattr(self, "quantization", None):
            return count_weights(self, exclude_embeddings)
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    @property
    def dtype(self) -> torch.dtype:
        return self.ln_f.weight.dtype  # norms stay float in every Linear kind

    @property
    def device(self) -> torch.device:
        return self.ln_f.weight.device

    # ------------------------------------------------------------------ compression
    def quantize(
        self,
        dtype: torch.dtype | str = torch.int8,
        group_size: int | None = 64,
        method: str = "rtn",
        calibration: torch.Tensor | list | None = None,
        **kw: Any,
    ) -> Transformer:
        """Quantize the projections in place (int8 or int4; RTN, GPTQ, AWQ or W8A8) and return self.

        `calibration`: token ids [n, seq] (needed by gptq, awq and w8a8). `skip=("lm_head",)` keeps the
        head float, `skip=("embeddings",)` the token embeddings. See `llmkit.model.quant.quantize_model`.
        """
        return quantize_model(self, dtype, group_size, method, calibration, **kw)

    def prepare_qat(self, dtype: torch.dtype | str = "int4", group_size: int | None = 64, **kw: Any) -> Transformer:
        """Quantization-aware training: the projections train through fake quantization (STE)."""
        return prepare_qat(self, dtype, group_size, **kw)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, S] 1 = token, 0 = padding (S = past + T)
        position_ids: torch.Tensor | None = None,  # [B, T]
        kv_cache: Any = None,
        num_logits_to_keep: int | torch.Tensor = 0,  # > 0: only the last positions' logits (generation);
        # a 1-D tensor: the logits of these positions only (a packed engine batch)
        attn_meta: AttnMeta | None = None,  # from a cache (generation, engine): positions and masks;
        # its position_ids are the ones used
        return_hidden: bool = False,  # the final-normed hidden states [B, T, C] instead of the logits
        # (a loss that applies lm_head itself: train/linear_ce.py)
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, num_logits_to_keep, vocab]).

        A plain call builds its `AttnMeta` from `attention_mask`/`position_ids` and checks its
        inputs; callers that pass `attn_meta` (the caches) have validated the ids already.
        """
        cfg = self.config
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be 2-D [batch, seq], got shape {tuple(input_ids.shape)}")
        meta = attn_meta
        if meta is None:
            if self.check_inputs:
                check_token_ids(input_ids, cfg.vocab_size)
            past = kv_cache.get_seq_length() if kv_cache is not None and hasattr(kv_cache, "get_seq_length") else 0
            meta = AttnMeta.for_inputs(input_ids, past, attention_mask, position_ids)
        positions = meta.position_ids

        x = self.wte(input_ids)  # [B, T, C]
        if cfg.scale_embeddings:
            x = x * torch.tensor(cfg.n_embd**0.5, dtype=x.dtype)
        if self.wpe is not None or self.pe is not None:
            if attn_meta is None and self.check_inputs and int(positions.max()) >= cfg.block_size:
                raise InputError(f"sequence of {int(positions.max()) + 1} positions exceeds the context "
                                 f"length block_size={cfg.block_size} of this model")
            x = x + (self.wpe(positions) if self.wpe is not None else self.pe[positions].to(x.dtype))
        if self.training and cfg.dropout:
            x = self.drop(x)
        cos_sin = self._rope(positions, x.dtype, meta.kv_len if attn_meta is not None else None)

        masks = {w: self._mask(meta, w, x.dtype) for w in self.windows}
        for block in self.blocks:
            x = call(block, x, cos_sin, masks[block._modules["attn"].window], kv_cache)
        if isinstance(num_logits_to_keep, torch.Tensor):
            x = x[:, num_logits_to_keep]
        elif num_logits_to_keep:
            x = x[:, -num_logits_to_keep:]
        if cfg.n_expert > 0:
            self.aux_loss = self._load_balancing_loss()
        if return_hidden:
            return self.ln_f(x)
        logits = self.lm_head(self.ln_f(x))
        if cfg.final_softcap is not None:
            logits = cfg.final_softcap * torch.tanh(logits / cfg.final_softcap)
        return logits

    @property
    def windows(self) -> set[int | None]:
        """The distinct sliding windows of the layers (None = full attention)."""
        key = id(self.blocks), len(self.blocks)  # layer pruning replaces or shortens the list
        cached = self.__dict__.get("_windows")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_windows"] = (key, {blk.attn.window for blk in self.blocks})
        return cached[1]

    def _rope_table(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [n', hd] for positions 0..n'-1 (n' >= n), computed as `rope_cos_sin` does;
        kept until the frequencies, dtype or device change (cached generation reads rows of it)."""
        inv_freq = self.inv_freq
        key = (inv_freq.data_ptr(), inv_freq.device, dtype)
        table = self.__dict__.get("_rope_cache")
        if table is None or table[0] != key or table[1].shape[0] < n:
            rows = max(n, self.config.block_size)
            pos = torch.arange(rows, device=inv_freq.device)[None]
            cos, sin = rope_cos_sin(inv_freq, pos, dtype, rope_attention_factor(self.config))  # [1, 1, n', hd]
            table = self.__dict__["_rope_cache"] = (key, cos[0, 0], sin[0, 0])
        return table[1], table[2]

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype, kv_len: int | None = None):
        """RoPE cos and signed sin [B, 1, T, hd] (dynamic NTK and LongRoPE depend on the sequence
        length); with a separate local RoPE, the list [global, local]. With `kv_len` (a cache's forward:
        every position is below it) plain RoPE reads the rows of a precomputed table."""
        if self.inv_freq is None:
            return None
        cfg = self.config
        inv_freq = self.inv_freq
        if kv_len is not None and cfg.rope_type not in ("dynamic", "longrope") and cfg.rope_local_theta is None:
            cos, sin = self._rope_table(kv_len, dtype)
            return cos[positions][:, None], sin[positions][:, None]  # [B, 1, T, hd]
        if cfg.rope_type == "dynamic":
            inv_freq = rope_inv_freq(cfg, seq_len=int(positions.max()) + 1).to(positions.device)
        cos_sin = rope_cos_sin(inv_freq, positions, dtype, rope_attention_factor(cfg))
        if cfg.rope_type == "longrope":  # rows past the trained length use the long factors (per row)
            orig = cfg.rope_scaling["original_max_position_embeddings"]
            long_rows = (positions.max(-1).values + 1 > orig)[:, None, None, None]  # [B, 1, 1, 1]
            if bool(long_rows.any()):
                long = rope_cos_sin(rope_inv_freq(cfg, seq_len=orig + 1).to(positions.device), positions, dtype,
                                    rope_attention_factor(cfg))
                cos_sin = tuple(torch.where(long_rows, lo, sh) for lo, sh in zip(long, cos_sin))
        if cfg.rope_local_theta is None:
            return cos_sin
        return [cos_sin, rope_cos_sin(self.inv_freq_local, positions, dtype)]

    def _mask(self, meta: AttnMeta, window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The layers' attention mask; ALiBi turns it into its additive bias."""
        if self.alibi_slopes is None:
            return meta.mask(window, explicit=self.config.attn_softcap is not None)
        m = meta.mask(window, explicit=True)
        S, T = meta.kv_len, meta.q_len
        q_pos = torch.arange(S - T, S, device=m.device)[None]
        k_pos = torch.arange(S, device=m.device)[None]
        bias = alibi_bias(self.alibi_slopes, q_pos, k_pos).to(dtype)  # [1, H, T, S]
        return bias.masked_fill(~m, float("-inf"))

    def _load_balancing_loss(self) -> torch.Tensor:
        """Switch-Transformer auxiliary loss E * sum_e f_e * P_e over all MoE layers (unscaled)."""
        stats = [blk.mlp.stats for blk in self.blocks if isinstance(blk.mlp, MoE) and blk.mlp.stats]
        counts = sum(s[0] for s in stats)
        probs = sum(s[1] for s in stats)
        rows = sum(s[2] for s in stats)
        return self.config.n_expert * torch.sum((counts / rows) * (probs / rows))

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str, max_shard_size: int = 5 * 2**30) -> None:
        """Write a Hugging Face folder (config.json + safetensors) atomically."""
        hf.save_pretrained(self, path, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device: str | None = None):
        return hf.load_model(path, dtype=dtype, device=device)


hf.MODEL_CLASSES["decoder"] = Transformer
