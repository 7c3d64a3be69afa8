"""Paged (block) KV cache: many sequences of different lengths share one pool of fixed-size blocks.

Each layer owns a key pool and a value pool of shape [num_blocks, Hkv, kv_block_size, D]. A sequence
owns a block table (list of block ids); token ``i`` of the sequence lives in block
``table[i // kv_block_size]`` at offset ``i % kv_block_size``. Blocks come from one free list and return to
it when the sequence finishes or is cancelled, so memory never fragments (PagedAttention,
Kwon et al. 2023).

`PagedKVCache.batch(...)` returns a `PagedBatch`, the object passed to the model as ``kv_cache``:
it implements the model's hook ``update(layer_idx, k, v) -> (k_all, v_all)`` for a batch of
sequences with different cached lengths and carries the matching `AttnMeta` (``meta``).
"""

from __future__ import annotations

import math

import torch

from llmkit.errors import InputError
from llmkit.model.attention import AttnMeta


class OutOfBlocksError(InputError):
    """The block pool has too few free blocks for the requested sequence."""


class BlockAllocator:
    """A free list of block ids ``0..num_blocks-1``."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise InputError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} KV blocks but only {len(self._free)} of {self.num_blocks} are free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """Block pools for every layer plus one block table per sequence.

    A sequence reserves its worst-case number of blocks when added (so it can never run out
    mid-generation) and takes them from the free list as it grows. With a sliding window,
    blocks that fell entirely out of the window go back to the pool, so a long sequence only
    ever holds about ``(window + max_chunk) / kv_block_size`` blocks; ``max_chunk`` is the most
    tokens one forward appends to a sequence (the prefill chunk).
    """

    def __init__(
        self,
        n_layer: int,
        n_kv_head: int,
        head_dim: int,
        num_blocks: int,
        kv_block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        sliding_window: int | None = None,
        max_chunk: int = 512,
        mask_windows: set[int | None] | None = None,
    ):
        if kv_block_size < 1:
            raise InputError(f"kv_block_size must be >= 1, got {kv_block_size}")
        self.kv_block_size = kv_block_size  # tokens per KV page (not the model's context length)
        self.sliding_window = sliding_window  # blocks out of this window are freed
        # the attention windows masks are built for (models that mix sliding-window and full-attention
        # layers keep every block: sliding_window=None, mask_windows={None, w})
        self.mask_windows = set(mask_windows) if mask_windows is not None else {sliding_window}
        self.max_chunk = max_chunk
        shape = (num_blocks, n_kv_head, kv_block_size, head_dim)
        self.k_pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v_pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.heads = torch.arange(n_kv_head, device=device)
        self.allocator = BlockAllocator(num_blocks)
        self.block_tables: dict[int, list[int | None]] = {}  # None: freed (out of the window)
        self.lengths: dict[int, int] = {}  # tokens already stored per sequence
        self.capacity: dict[int, int] = {}  # most tokens the sequence may hold
        self.reserved: dict[int, int] = {}  # blocks promised to the sequence but not yet taken

    # ---- sequence lifetime -------------------------------------------------------------------
    def blocks_needed(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.kv_block_size)

    def blocks_to_reserve(self, max_tokens: int) -> int:
        """Most blocks a sequence of up to ``max_tokens`` tokens holds at once."""
        n = self.blocks_needed(max_tokens)
        if self.sliding_window is not None:  # live keys: [first query - window + 1, last new token]
            n = min(n, self.blocks_needed(self.sliding_window - 1 + self.max_chunk) + 1)
        return n

    @property
    def num_free_blocks(self) -> int:
        """Blocks neither in use nor promised to a running sequence."""
        return self.allocator.num_free - sum(self.reserved.values())

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def can_allocate(self, max_tokens: int) -> bool:
        return self.blocks_to_reserve(max_tokens) <= self.num_free_blocks

    def add_sequence(self, seq_id: int, max_tokens: int) -> None:
        """Reserve blocks for a sequence that will hold at most ``max_tokens`` tokens."""
        if seq_id in self.block_tables:
            raise InputError(f"sequence {seq_id} is already in the KV cache")
        n = self.blocks_to_reserve(max_tokens)
        if n > self.num_free_blocks:
            raise OutOfBlocksError(f"need {n} KV blocks but only {self.num_free_blocks} of {self.num_blocks} are free")
        self.block_tables[seq_id] = []
        self.lengths[seq_id] = 0
        self.capacity[seq_id] = max_tokens
        self.reserved[seq_id] = n

    def free_sequence(self, seq_id: int) -> None:
        """Return a sequence's blocks to the free list (no-op if it is unknown)."""
        blocks = self.block_tables.pop(seq_id, None)
        if blocks is not None:
            self.allocator.free([b for b in blocks if b is not None])
        self.lengths.pop(seq_id, None)
        self.capacity.pop(seq_id, None)
        self.reserved.pop(seq_id, None)

    def _grow(self, seq_id: int, first_query: int, total: int) -> None:
        """Free blocks below the window of ``first_query``; take blocks up to ``total`` tokens."""
        table, bs = self.block_tables[seq_id], self.kv_block_size
        if self.sliding_window is not None:
            dead = min(max(0, first_query - self.sliding_window + 1) // bs, len(table))
            for j in range(dead):
                if table[j] is not None:
                    self.allocator.free([table[j]])
                    table[j] = None
                    self.reserved[seq_id] += 1
        n = self.blocks_needed(total) - len(table)
        if n > self.reserved[seq_id]:
            raise OutOfBlocksError(
                f"sequence {seq_id} needs {n} more KV blocks but has only {self.reserved[seq_id]} reserved "
                f"(appending more than max_chunk={self.max_chunk} tokens in one forward?)"
            )
        if n > 0:
            table += self.allocator.allocate(n)
            self.reserved[seq_id] -= n

    def batch(self, seq_ids: list[int], q_lens: list[int]) -> PagedBatch:
        """A kv-cache view that appends ``q_lens[b]`` new tokens to sequence ``seq_ids[b]``."""
        return PagedBatch(self, seq_ids, q_lens)


class PagedBatch:
    """The model's kv-cache hook for one forward over a batch of paged sequences.

    Row ``b`` holds ``q_lens[b]`` new tokens (right-padded to T = max(q_lens)) appended after the
    ``start[b]`` tokens already cached. Pass ``meta`` (its `AttnMeta`) to the model together with
    it, then call `commit()` once the forward has run.
    """

    def __init__(self, cache: PagedKVCache, seq_ids: list[int], q_lens: list[int]):
        self.cache = cache
        self.seq_ids = list(seq_ids)
        self.q_lens = list(q_lens)
        device = cache.k_pool[0].device
        bs = cache.kv_block_size
        starts = [cache.lengths[s] for s in seq_ids]
        totals = [st + q for st, q in zip(starts, q_lens)]
        for s, st, tot in zip(seq_ids, starts, totals):
            if tot > cache.capacity[s]:
                raise OutOfBlocksError(f"sequence {s} would hold {tot} tokens but was added for {cache.capacity[s]}")
            cache._grow(s, st, tot)
        T, S = max(q_lens), max(totals)
        self.starts, self.totals, self.kv_len, self.q_len = starts, totals, S, T

        # flat slot of each real new token (row b, step t) in a pool viewed as [NB * bs, ...] rows
        rows, steps, slots = [], [], []
        for b, (s, st, q) in enumerate(zip(seq_ids, starts, q_lens)):
            table = cache.block_tables[s]
            for t in range(q):
                rows.append(b)
                steps.append(t)
                slots.append(table[(st + t) // bs] * bs + (st + t) % bs)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        self._all_real = all(q == T for q in q_lens)
        if not (self._all_real and T == 1):  # not a plain decode step: pick the real tokens out
            self._rows, self._steps = as_long(rows), as_long(steps)

        # write: rows of one (block, head, offset) of the pool viewed as [NB * Hkv * bs, D];
        # gather: rows of one (block, head) of the pool viewed as [NB * Hkv, bs * D], which land
        # directly in [B, Hkv, nb * bs, D]. Freed (out-of-window) and padding entries point at any
        # live block of the row: their keys are masked anyway.
        Hkv = cache.k_pool[0].shape[1]
        nb = cache.blocks_needed(S)
        padded_tables = []
        for s in seq_ids:
            t = cache.block_tables[s]
            live = next(x for x in reversed(t) if x is not None)
            padded_tables.append([live if x is None else x for x in t[:nb]] + [live] * (nb - len(t)))
        table, slot = as_long(padded_tables), as_long(slots)  # [B, nb], [N]
        heads = cache.heads  # [Hkv]
        self._gather_rows = (table[:, None, :] * Hkv + heads[None, :, None]).flatten()  # [B * Hkv * nb]
        blk, off = slot // bs, slot % bs
        self._write_rows = ((blk[:, None] * Hkv + heads[None, :]) * bs + off[:, None]).flatten()  # [N * Hkv]
        self._shape = (len(seq_ids), Hkv, nb * bs)

        # positions [B, T]: padded query slots repeat the row's last real position
        start_t = as_long(starts)[:, None]
        if T == 1:
            self.position_ids = start_t
        else:
            last = as_long([q - 1 for q in q_lens])[:, None]
            self.position_ids = start_t + torch.minimum(torch.arange(T, device=device)[None, :], last)

        # key columns are positions: a query sees the row's keys up to its own position (a padded
        # row's queries never reach past its last real key); plain causal when all rows are alike
        uniform = all(tot == S for tot in totals) and self._all_real
        self.meta = AttnMeta(self.position_ids, S, q_cols=None if uniform else self.position_ids)
        self.mask_windows = cache.mask_windows

    @property
    def attn_masks(self) -> dict[int | None, torch.Tensor | None]:
        """Mask per attention window (None = plain causal attention is exact)."""
        return {w: self.meta.mask(w) for w in self.mask_windows}

    @property
    def attn_mask(self) -> torch.Tensor:
        """The explicit [B, 1, T, S] mask of the cache's window."""
        return self.meta.mask(self.cache.sliding_window, explicit=True)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values ([B, Hkv, T, D]) and return all keys/values ([B, Hkv, S, D])."""
        k_pool, v_pool = self.cache.k_pool[layer_idx], self.cache.v_pool[layer_idx]
        if self._all_real and k.shape[2] == 1:  # decode: one token per row
            k_new, v_new = k[:, :, 0], v[:, :, 0]  # [B, Hkv, D]
        else:
            k_new = k[self._rows, :, self._steps]  # [N, Hkv, D]
            v_new = v[self._rows, :, self._steps]
        D = k_pool.shape[-1]
        k_pool.view(-1, D).index_copy_(0, self._write_rows, k_new.reshape(-1, D).to(k_pool.dtype))
        v_pool.view(-1, D).index_copy_(0, self._write_rows, v_new.reshape(-1, D).to(v_pool.dtype))
        # one gather of whole (block, head) rows straight into [B, Hkv, nb * bs, D], then the first S keys
        n_rows = k_pool.shape[0] * k_pool.shape[1]
        k_all = k_pool.view(n_rows, -1).index_select(0, self._gather_rows).view(*self._shape, D)
        v_all = v_pool.view(n_rows, -1).index_select(0, self._gather_rows).view(*self._shape, D)
        return k_all[:, :, : self.kv_len], v_all[:, :, : self.kv_len]

    def get_seq_length(self) -> int:
        """Keys before the T new ones in the gathered [S] axis (S - T), as the model's hook expects.

        Rows differ in length; position-relative biases (ALiBi) computed from this common offset
        differ from each row's own by a per-row constant, which softmax ignores.
        """
        return self.kv_len - self.q_len

    def commit(self) -> None:
        """Record the appended tokens once the forward has written every layer."""
        for s, tot in zip(self.seq_ids, self.totals):
            self.cache.lengths[s] = tot
