"""Attention metadata: what the one forward needs to know about the keys it attends to.

Every cache produces an `AttnMeta` (the static cache for `generate`, the paged cache for the
engine; a plain forward builds one from its inputs) and the model consumes it. `AttnMeta.mask`
is the only place that decides between plain causal attention and an explicit mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def causal_mask(q_cols: Tensor, kv_len: int, window: int | None = None, key_mask: Tensor | None = None) -> Tensor:
    """Boolean mask [B, 1, T, S] (True = may attend) for queries sitting at key columns `q_cols` [B|1, T].

    A query sees keys at columns <= its own, within `window` of it, and not marked 0 in the
    [B, S] padding mask `key_mask`. It always sees its own column, so rows of pad queries never
    become all-False (softmax would return NaN and poison later layers through the values).
    """
    k = torch.arange(kv_len, device=q_cols.device)[None, None, :]  # [1, 1, S]
    q = q_cols[:, :, None]  # [B, T, 1]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    if key_mask is not None:
        mask = mask & key_mask[:, None, :].bool()
    return (mask | (k == q))[:, None]


def build_attn_mask(
    attention_mask: Tensor | None,
    q_len: int,
    kv_len: int,
    sliding_window: int | None = None,
    device: torch.device | None = None,
    batch_size: int = 1,
) -> Tensor:
    """Mask [B, 1, T, S] for T queries that are the last T of S keys, with a [B, S] 0/1 padding mask."""
    if attention_mask is not None:
        device, batch_size = attention_mask.device, attention_mask.shape[0]
    q_cols = torch.arange(kv_len - q_len, kv_len, device=device)[None]
    return causal_mask(q_cols, kv_len, sliding_window, attention_mask).expand(batch_size, 1, q_len, kv_len)


@dataclass
class AttnMeta:
    """Positions of the T new tokens and where they sit among the S keys of one forward.

    `q_cols` None means every row's queries are the last T of its S keys; `key_mask` None means
    every key is a real token. A caller that builds an `AttnMeta` has validated the token ids.
    """

    position_ids: Tensor  # [B, T] rotary / learned position of each new token
    kv_len: int  # S: keys each query row is laid against (cached + new)
    q_cols: Tensor | None = None  # [B|1, T] key column of each query
    key_mask: Tensor | None = None  # [B, S] 1 = real key, 0 = padding
    segment_ids: Tensor | None = None  # [B, S] packed rows: a query sees only keys of its own segment
    _masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_inputs(
        cls, input_ids: Tensor, past: int = 0, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> AttnMeta:
        """Metadata of a plain forward: T new tokens after `past` cached ones (HF conventions)."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        return cls(position_ids, past + T, key_mask=attention_mask)

    @property
    def q_len(self) -> int:
        return self.position_ids.shape[1]

    def is_plain_causal(self, window: int | None) -> bool:
        """True when SDPA's own causal attention (or none, for one query) is exact for this window."""
        T, S = self.q_len, self.kv_len
        return (self.q_cols is None and self.key_mask is None and self.segment_ids is None and T in (1, S)
                and (window is None or S <= window))

    def mask(self, window: int | None, explicit: bool = False) -> Tensor | None:
        """Mask [B|1, 1, T, S] for layers with this sliding window, or None when plain causal is exact
        (`explicit=True` always builds it, e.g. for ALiBi's bias)."""
        if not explicit and self.is_plain_causal(window):
            return None
        if window not in self._masks:
            T, S = self.q_len, self.kv_len
            q_cols = self.q_cols
            if q_cols is None:  # the last T of S columns
                q_cols = torch.arange(S - T, S, device=self.position_ids.device)[None]
            m = causal_mask(q_cols, S, window, self.key_mask)
            if self.segment_ids is not None:  # [B, S] -> query segments [B, T] by their columns
                seg = self.segment_ids
                seg_q = seg.gather(1, q_cols.expand(seg.shape[0], T))
                m = m & (seg_q[:, None, :, None] == seg[:, None, None, :])  # own column always kept
            self._masks[window] = m
        return self._masks[window]
