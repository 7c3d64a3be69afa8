"""Position encodings: RoPE (with linear / dynamic-NTK / llama3 scaling), ALiBi, sinusoidal."""

from __future__ import annotations

import math

import torch

from llmkit.errors import ConfigError
from llmkit.model.config import ModelConfig

# ---------------------------------------------------------------- RoPE (Su et al., 2021)


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None, local: bool = False) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] for RoPE, after `rope_scaling` (computed in float32).

    `local=True`: the sliding-window layers' own unscaled RoPE (`rope_local_theta`, Gemma 3).
    """
    d = cfg.head_dim
    if local:
        return 1.0 / (cfg.rope_local_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    base = cfg.rope_theta
    sc = cfg.rope_scaling or {}
    kind = cfg.rope_type
    if kind == "longrope":  # LongRoPE (Phi-3): per-frequency factors, long ones past the trained length
        orig = sc["original_max_position_embeddings"]
        factors = sc["long_factor"] if seq_len is not None and seq_len > orig else sc["short_factor"]
        shape = torch.arange(0, d, 2, dtype=torch.int64).float() / d
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base**shape)
    if kind == "dynamic":  # NTK-aware: grow the base once the sequence exceeds the trained length
        orig = sc.get("original_max_position_embeddings") or cfg.block_size
        factor = sc["factor"]
        if seq_len is not None and seq_len > orig:
            base = base * ((factor * seq_len / orig) - (factor - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if kind in ("default", "dynamic"):
        return inv_freq
    if kind == "linear":  # position interpolation: positions / factor
        return inv_freq / sc["factor"]
    if kind == "llama3":  # frequency-dependent interpolation (Llama 3.1)
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, scaled)
    raise ConfigError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, dynamic, llama3, longrope")


def rope_attention_factor(cfg: ModelConfig) -> float:
    """Scale applied to cos and sin: LongRoPE's sqrt(1 + ln(s) / ln(L_orig)) for s = L / L_orig, else 1."""
    sc = cfg.rope_scaling or {}
    if cfg.rope_type != "longrope":
        return 1.0
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    orig = sc["original_max_position_embeddings"]
    factor = sc.get("factor") or cfg.block_size / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos and signed sin [-sin, sin], each [B, 1, T, head_dim], for positions [B, T] (halves layout)."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :].to(position_ids.device)  # [B,T,D/2]
    cos, sin = freqs.cos(), freqs.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return torch.cat((cos, cos), -1)[:, None].to(dtype), torch.cat((-sin, sin), -1)[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, D] by the angles in cos/sin (halves layout, as Hugging Face stores weights).

    x * cos + rotate_half(x) * sin, where rotate_half(x) * sin == roll(x, D/2) * [-sin, sin].
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


# ---------------------------------------------------------------- ALiBi (Press et al., 2022)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head slopes: a geometric sequence 2^(-8/n), interleaved for non-powers of two."""

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(pow2(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(pow2(closest) + pow2(2 * closest)[0::2][: n_head - closest])


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Additive bias [B, H, T, S] = -slope * (q_pos - k_pos); q_pos [B,T], k_pos [B,S]."""
    dist = (q_pos[:, :, None] - k_pos[:, None, :]).float()  # [B,T,S]
    return -slopes.to(dist.device)[None, :, None, None] * dist[:, None]


# ---------------------------------------------------------------- sinusoidal (Vaswani et al., 2017)


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...); shape [n_pos, dim]."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n_pos, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


# ---------------------------------------------------------------- T5 relative buckets (Raffel et al., 2020)


def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bucket of each relative position `rel` = key - query: exact for small distances, log-spaced up to
    `max_distance`; bidirectional (encoder) uses half the buckets per direction, causal ones only look back."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -rel.clamp(max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)
