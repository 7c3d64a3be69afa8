"""Attention masks: causal, padding and sliding window, as one boolean tensor (True = may attend)."""

from __future__ import annotations

import torch


def build_attn_mask(
    attention_mask: torch.Tensor | None,
    q_len: int,
    kv_len: int,
    sliding_window: int | None = None,
    device: torch.device | None = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """Mask [B, 1, T, S] for T queries that are the last T of S key positions.

    `attention_mask` is the usual 2-D [B, S] 0/1 padding mask over all S keys (or None).
    Each query may always see its own position, so rows of pad tokens never become all-False
    (which would make softmax return NaN and poison later layers through the values).
    """
    if attention_mask is not None:
        device = attention_mask.device
        batch_size = attention_mask.shape[0]
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # [T,1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1,S]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    mask = mask[None, None].expand(batch_size, 1, q_len, kv_len)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
    return mask | (k_pos == q_pos)[None, None]
