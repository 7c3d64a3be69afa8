"""Static (preallocated) key/value cache for batched generation.

Every layer gets two buffers of fixed shape [B, Hkv, max_len, D] allocated once; each forward
writes its new keys/values in place at the current length and attends over the prefix.
Grouped-query and multi-query attention just mean Hkv < H; sliding-window models keep all keys
and get the window from the attention mask (`AttnMeta.mask`), which is exact. `attn_meta(T)` is
the metadata of the next forward of T tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkit.errors import InputError
from llmkit.model.attention import AttnMeta


class StaticKVCache:
    """Preallocated per-sequence KV cache implementing the model's `update(layer_idx, k, v)` hook.

    All rows share one length (prompts are left-padded to a common length); the cache advances
    by T after the last layer's update, so a plain `model(ids, kv_cache=cache, ...)` loop works.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.n_layer = n_layer
        self.max_len = max_len
        self.length = 0  # tokens stored so far (per row, including left padding)
        self.key_mask: Tensor | None = None  # [B, max_len] 0 = left padding (None: no padding)
        self.positions: Tensor | None = None  # [B, max_len] position of each column (None: the column)
        self.prefix = 0  # leading columns a prompt-tuned model fills itself (its virtual tokens)
        # plain fp32 CPU buffers: a decode step's C attention writes its keys/values itself (`slot`)
        self.fused_decode = dtype == torch.float32 and torch.device(device).type == "cpu"

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> StaticKVCache:
        """A cache sized for `model` (a `Transformer`, or a `T5Model`'s decoder), in the dtype/device of
        its weights; a prompt-tuned model gets room for its virtual tokens too."""
        cfg = model.config
        w = next(model.parameters())
        n_layer = cfg.n_decoder_layer if getattr(model, "is_encoder_decoder", False) else cfg.n_layer
        prefix = getattr(model, "num_virtual_tokens", 0)
        cache = cls(n_layer, batch_size, cfg.n_kv_head, cfg.head_dim, max_len + prefix, w.dtype, w.device)
        cache.prefix = prefix
        return cache

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, Hkv, T, D] at the current length; return all keys/values [B, Hkv, S, D]."""
        T = k.shape[2]
        K, V, start = self.slot(layer_idx, T)
        K.narrow(2, start, T).copy_(k)  # narrow: one cheap op, where [:, :, a:b] indexing is several
        V.narrow(2, start, T).copy_(v)
        return K.narrow(2, 0, start + T), V.narrow(2, 0, start + T)

    def slot(self, layer_idx: int, T: int) -> tuple[Tensor, Tensor, int]:
        """The layer's whole key and value buffers [B, Hkv, max_len, D] and the column where its T new
        tokens go, for a caller that writes them itself (`update`, a decode step's C attention); the
        cache advances by T after the last layer."""
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise InputError(
                f"KV cache holds {self.max_len} positions but {end} are needed; "
                "allocate a longer cache (max_len) or generate fewer tokens"
            )
        if layer_idx == self.n_layer - 1:
            self.length = end
        return self.k[layer_idx], self.v[layer_idx], start

    def set_padding(self, key_mask: Tensor) -> None:
        """Rows are left-padded: `key_mask` [B, max_len] marks real columns; positions start at 0 at
        each row's first real token, so a row's output does not depend on its batch. A prompt-tuned
        model's virtual-token columns are prepended as real tokens."""
        if self.prefix:
            key_mask = torch.cat([key_mask.new_ones(key_mask.shape[0], self.prefix), key_mask], 1)
        self.key_mask = key_mask
        self.positions = (key_mask.cumsum(-1) - 1).clamp(min=0)

    def attn_meta(self, T: int) -> AttnMeta:
        """Metadata of a forward that appends T tokens to every row."""
        start, end = self.length, self.length + T
        device = self.k[0].device
        if self.positions is None:
            return AttnMeta(torch.arange(start, end, device=device).expand(self.k[0].shape[0], T), end)
        return AttnMeta(self.positions[:, start:end], end, key_mask=self.key_mask[:, :end])

    def rollback(self, n: int) -> None:
        """Forget the last n stored positions of every row (speculative decoding's rejected drafts)."""
        self.length = max(self.prefix, self.length - n)

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        """Forget every stored position (buffers are reused)."""
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
