"""Paged (block) KV cache with prefix caching: many sequences share one pool of fixed-size blocks.

Each layer owns a key pool and a value pool of shape [num_blocks, Hkv, kv_block_size, D]. A
sequence owns a block table (list of block ids); token ``i`` of the sequence lives in block
``table[i // kv_block_size]`` at offset ``i % kv_block_size`` (PagedAttention, Kwon et al. 2023).

Blocks are taken on demand as a sequence grows (`blocks_to_append` says how many the next forward
needs; the engine preempts a sequence when the pool runs dry). Blocks are reference-counted:

- **prefix caching**: a full block is named by a chain hash of its tokens and of every token
  before it (plus an ``extra_key`` such as the LoRA adapter). A new sequence whose prompt starts
  with cached blocks takes them (refcount + 1) and prefills only the rest;
- a write into a block that is shared or cached copies it first (**copy-on-write**): this
  happens when a whole prompt is cached and its last token is recomputed for its logits;
- a block whose refcount drops to 0 stays cached but evictable; allocation takes free blocks
  first, then evicts the least recently released cached block (**LRU**).

`PagedKVCache.batch(...)` returns a `PagedBatch`, the object passed to the model as ``kv_cache``:
it implements the model's hook ``update(layer_idx, k, v) -> (k_all, v_all)`` for a batch of
sequences with different cached lengths and carries the matching `AttnMeta` (``meta``). Rows are
either right-padded to a common length ([B, T]) or packed into one row ([1, N], each token
attending only to its own sequence's keys: a long prefill chunk and many 1-token decode steps
share a forward without padding every row to the chunk's length).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import torch

from llmkit.errors import InputError
from llmkit.model.attention import AttnMeta


class OutOfBlocksError(InputError):
    """The block pool has too few free blocks for the requested sequence."""


def block_hash(parent: bytes, tokens: list[int], extra_key: str | None = None) -> bytes:
    """Chain hash of one full block: its tokens, the hash of the blocks before it and `extra_key`
    (a cryptographic hash: a crafted prompt cannot collide with another client's prefix)."""
    h = hashlib.blake2b(parent, digest_size=16)
    if extra_key is not None and not parent:
        h.update(extra_key.encode("utf-8", "surrogatepass") + b"\0")
    h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens))
    return h.digest()


class BlockPool:
    """Block ids ``0..num_blocks-1`` with refcounts, the prefix cache (hash -> block) and its LRU."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise InputError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.ref = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # chain hash -> block holding those keys/values
        self.hash_of: dict[int, bytes] = {}  # block -> its chain hash (registered blocks only)
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: never used, or cached but unreferenced (evictable)."""
        return len(self._free) + len(self.lru)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocksError(f"need {n} KV blocks but only {self.num_free} of {self.num_blocks} are free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently released cached block
                b, _ = self.lru.popitem(last=False)
                del self.cached[self.hash_of.pop(b)]
                self.evictions += 1
            self.ref[b] = 1
            out.append(b)
        return out

    def take(self, b: int) -> None:
        """One more holder of block `b` (a prefix-cache hit)."""
        if self.ref[b] == 0:
            self.lru.pop(b, None)
        self.ref[b] += 1

    def release(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if b in self.hash_of:
                self.lru[b] = None  # most recently released: evicted last
            else:
                self._free.append(b)

    def register(self, b: int, h: bytes) -> None:
        """Name full block `b` by chain hash `h` (first writer wins: duplicates stay private)."""
        if h not in self.cached and b not in self.hash_of:
            self.cached[h] = b
            self.hash_of[b] = h


class PagedKVCache:
    """Block pools for every layer plus one block table per sequence.

    Blocks are taken as sequences grow. With a sliding window, blocks that fell entirely out of
    the window are released, so a long sequence only holds about ``window / kv_block_size`` blocks.
    With ``prefix_caching`` full blocks are shared between sequences with the same token prefix.
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
        mask_windows: set[int | None] | None = None,
        prefix_caching: bool = False,
    ):
        if kv_block_size < 1:
            raise InputError(f"kv_block_size must be >= 1, got {kv_block_size}")
        self.kv_block_size = kv_block_size  # tokens per KV page (not the model's context length)
        self.sliding_window = sliding_window  # blocks out of this window are released
        # the attention windows masks are built for (models that mix sliding-window and full-attention
        # layers keep every block: sliding_window=None, mask_windows={None, w})
        self.mask_windows = set(mask_windows) if mask_windows is not None else {sliding_window}
        self.prefix_caching = prefix_caching
        shape = (num_blocks, n_kv_head, kv_block_size, head_dim)
        self.k_pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v_pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[int, list[int | None]] = {}  # None: released (out of the window)
        self.lengths: dict[int, int] = {}  # tokens already stored per sequence
        self.tokens: dict[int, list[int]] = {}  # the stored tokens (to name full blocks)
        self.hashes: dict[int, list[bytes]] = {}  # chain hash of each full block so far
        self.extra_keys: dict[int, str | None] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found cached (not prefilled)

    # ---- sequence lifetime -------------------------------------------------------------------
    def blocks_needed(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.kv_block_size)

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to new tokens (free, or cached and evictable)."""
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def add_sequence(self, seq_id: int, prompt_ids: list[int] | None = None, extra_key: str | None = None,
                     lookup: bool = True) -> int:
        """Start a sequence; with prefix caching take the cached blocks its prompt starts with.
        Returns how many leading prompt tokens are already cached (never the last one: its logits
        are needed). `extra_key` separates caches whose keys differ for the same tokens (LoRA)."""
        if seq_id in self.block_tables:
            raise InputError(f"sequence {seq_id} is already in the KV cache")
        self.block_tables[seq_id], self.hashes[seq_id] = [], []
        self.lengths[seq_id], self.tokens[seq_id], self.extra_keys[seq_id] = 0, [], extra_key
        if not (self.prefix_caching and prompt_ids):
            return 0
        bs, table, hashes = self.kv_block_size, self.block_tables[seq_id], self.hashes[seq_id]
        parent = b""
        if lookup:
            for j in range(len(prompt_ids) // bs):
                parent = block_hash(parent, prompt_ids[j * bs : (j + 1) * bs], extra_key)
                b = self.pool.cached.get(parent)
                if b is None:
                    break
                self.pool.take(b)
                table.append(b)
                hashes.append(parent)
        n = min(len(table) * bs, len(prompt_ids) - 1)
        self.lengths[seq_id], self.tokens[seq_id] = n, list(prompt_ids[:n])
        del hashes[n // bs :]  # a block the last token is rewritten into is copied on write
        self.prefix_queries += len(prompt_ids)
        self.prefix_hits += n
        return n

    def free_sequence(self, seq_id: int) -> None:
        """Release a sequence's blocks, last block first (so a prompt's tail is evicted before its
        shared head); a no-op if it is unknown."""
        blocks = self.block_tables.pop(seq_id, None)
        if blocks is not None:
            for b in reversed(blocks):
                if b is not None:
                    self.pool.release(b)
        for d in (self.lengths, self.tokens, self.hashes, self.extra_keys):
            d.pop(seq_id, None)

    def rollback(self, seq_id: int, length: int) -> None:
        """Forget a sequence's tokens from ``length`` on (speculative decoding's rejected drafts). Its
        blocks stay with it; a block already named in the prefix cache is copied before it is
        written again (its keys stay right for the tokens it was named by)."""
        if seq_id not in self.lengths:
            return
        length = min(self.lengths[seq_id], max(0, length))
        self.lengths[seq_id] = length
        del self.tokens[seq_id][length:]
        del self.hashes[seq_id][length // self.kv_block_size :]

    def blocks_to_append(self, seq_id: int, n: int) -> int:
        """New blocks that storing `n` more tokens of the sequence takes (a copy-on-write included)."""
        table, start = self.block_tables.get(seq_id, []), self.lengths.get(seq_id, 0)
        need = self.blocks_needed(start + n) - len(table)
        j = start // self.kv_block_size
        if n > 0 and j < len(table) and table[j] is not None and self._shared(table[j]):
            need += 1
        return need

    def _shared(self, b: int) -> bool:
        return self.pool.ref[b] > 1 or b in self.pool.hash_of

    def _grow(self, seq_id: int, first_query: int, total: int) -> None:
        """Release blocks below the window of ``first_query``; take blocks up to ``total`` tokens;
        copy the first written block if it is shared."""
        table, bs = self.block_tables[seq_id], self.kv_block_size
        if self.sliding_window is not None:
            dead = min(max(0, first_query - self.sliding_window + 1) // bs, len(table))
            for j in range(dead):
                if table[j] is not None:
                    self.pool.release(table[j])
                    table[j] = None
        start = self.lengths[seq_id]
        j = start // bs
        if total > start and j < len(table) and table[j] is not None and self._shared(table[j]):
            old, (new,) = table[j], self.pool.allocate(1)
            for pool in self.k_pool + self.v_pool:
                pool[new].copy_(pool[old])
            self.pool.release(old)
            table[j] = new
        n = self.blocks_needed(total) - len(table)
        if n > 0:
            table += self.pool.allocate(n)

    def batch(self, seq_ids: list[int], chunks: list[list[int]], packed: bool = False) -> PagedBatch:
        """A kv-cache view that appends the tokens ``chunks[b]`` to sequence ``seq_ids[b]``."""
        return PagedBatch(self, seq_ids, chunks, packed)

    def _commit(self, seq_id: int, chunk: list[int]) -> None:
        """Record stored tokens; name the blocks they filled in the prefix cache."""
        toks = self.tokens[seq_id]
        toks += chunk
        self.lengths[seq_id] = len(toks)
        if not self.prefix_caching:
            return
        bs, hashes, table = self.kv_block_size, self.hashes[seq_id], self.block_tables[seq_id]
        while (len(hashes) + 1) * bs <= len(toks):
            j = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else b"", toks[j * bs : (j + 1) * bs],
                                     self.extra_keys[seq_id]))
            if table[j] is not None:
                self.pool.register(table[j], hashes[-1])


class PagedBatch:
    """The model's kv-cache hook for one forward over a batch of paged sequences.

    Padded layout: row ``b`` holds ``len(chunks[b])`` new tokens (right-padded to T) appended after
    the ``start[b]`` tokens already cached. Packed layout: one row of all N new tokens; the keys of
    every sequence lie side by side (S = sum of their lengths) and `meta.segment_ids` keeps each
    query to its own sequence. Pass ``meta`` to the model with it, then call `commit()`.
    ``last_index`` [B] is the column (of T, or of N when packed) of each chunk's last token.
    """

    def __init__(self, cache: PagedKVCache, seq_ids: list[int], chunks: list[list[int]], packed: bool = False):
        self.cache = cache
        self.seq_ids = list(seq_ids)
        self.chunks = [list(c) for c in chunks]
        self.packed = packed
        q_lens = [len(c) for c in chunks]
        self.q_lens = q_lens
        device = cache.k_pool[0].device
        bs = cache.kv_block_size
        starts = [cache.lengths[s] for s in seq_ids]
        totals = [st + q for st, q in zip(starts, q_lens)]
        for s, st, tot in zip(seq_ids, starts, totals):
            cache._grow(s, st, tot)
        self.starts, self.totals = starts, totals
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        Hkv = cache.k_pool[0].shape[1]

        # write: rows of one (block, head, offset) of the pool viewed as [NB * Hkv * bs, D], for each
        # real new token then each head (index lists built in Python: one tensor instead of ten small ops)
        write = []
        for s, st, q in zip(seq_ids, starts, q_lens):
            table = cache.block_tables[s]
            for i in range(st, st + q):
                base = table[i // bs] * Hkv * bs + i % bs
                write += [base + h * bs for h in range(Hkv)]
        self._write_rows = as_long(write)  # [N * Hkv]

        def live_table(s: int, nb: int) -> list[int]:
            # released (out-of-window) and padding entries point at any live block: masked anyway
            t = cache.block_tables[s]
            live = next(x for x in reversed(t) if x is not None)
            return [live if x is None else x for x in t[:nb]] + [live] * (nb - len(t))

        if packed:
            # keys: each sequence's blocks one after another, [1, Hkv, sum(nb_b) * bs, D]
            nbs = [cache.blocks_needed(tot) for tot in totals]
            tables = [b for s, nb in zip(seq_ids, nbs) for b in live_table(s, nb)]
            offsets = [0]
            for nb in nbs:
                offsets.append(offsets[-1] + nb * bs)
            S = offsets[-1]
            self._gather_rows = as_long([b * Hkv + h for h in range(Hkv) for b in tables])  # [Hkv * sum(nb)]
            self._shape = (1, Hkv, S)
            self._gather_head_major = True
            pos = [st + t for st, q in zip(starts, q_lens) for t in range(q)]
            cols = [offsets[b] + st + t for b, (st, q) in enumerate(zip(starts, q_lens)) for t in range(q)]
            seg = torch.full((1, S), -1, dtype=torch.long, device=device)
            for b, tot in enumerate(totals):
                seg[0, offsets[b] : offsets[b] + tot] = b
            self.position_ids = as_long(pos)[None]  # [1, N]
            q_cols = as_long(cols)[None]
            self.kv_len, self.q_len = S, len(pos)
            self.meta = AttnMeta(self.position_ids, S, q_cols=q_cols, segment_ids=seg)
            self.last_index = as_long([sum(q_lens[: b + 1]) - 1 for b in range(len(q_lens))])
            self._all_real = False
            self._rows = torch.zeros(len(pos), dtype=torch.long, device=device)
            self._steps = torch.arange(len(pos), device=device)
        else:
            T, S = max(q_lens), max(totals)
            self.kv_len, self.q_len = S, T
            rows = [b for b, q in enumerate(q_lens) for _ in range(q)]
            steps = [t for q in q_lens for t in range(q)]
            self._all_real = all(q == T for q in q_lens)
            if not (self._all_real and T == 1):  # not a plain decode step: pick the real tokens out
                self._rows, self._steps = as_long(rows), as_long(steps)
            # gather: rows of one (block, head) of the pool viewed as [NB * Hkv, bs * D], which land
            # directly in [B, Hkv, nb * bs, D]
            nb = cache.blocks_needed(S)
            tables = [live_table(s, nb) for s in seq_ids]  # [B][nb]
            self._gather_rows = as_long([b * Hkv + h for t in tables for h in range(Hkv) for b in t])  # [B * Hkv * nb]
            self._shape = (len(seq_ids), Hkv, nb * bs)
            self._gather_head_major = False
            # positions [B, T]: padded query slots repeat the row's last real position
            self.position_ids = as_long([[st + min(t, q - 1) for t in range(T)] for st, q in zip(starts, q_lens)])
            # key columns are positions: a query sees the row's keys up to its own position (a padded
            # row's queries never reach past its last real key); plain causal when all rows are alike
            uniform = all(tot == S for tot in totals) and self._all_real
            self.meta = AttnMeta(self.position_ids, S, q_cols=None if uniform else self.position_ids)
            self.last_index = as_long([T - 1] * len(seq_ids))
        self.mask_windows = cache.mask_windows

    def input_ids(self) -> torch.Tensor:
        """The token ids to feed: [B, T] right-padded by repeating each row's last token, or [1, N]."""
        device = self.cache.k_pool[0].device
        if self.packed:
            return torch.tensor([[t for c in self.chunks for t in c]], dtype=torch.long, device=device)
        T = self.q_len
        return torch.tensor([c + [c[-1]] * (T - len(c)) for c in self.chunks], dtype=torch.long, device=device)

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
        # one gather of whole (block, head) rows, then the first S keys
        n_rows = k_pool.shape[0] * k_pool.shape[1]
        k_all = k_pool.view(n_rows, -1).index_select(0, self._gather_rows).view(*self._shape, D)
        v_all = v_pool.view(n_rows, -1).index_select(0, self._gather_rows).view(*self._shape, D)
        return k_all[:, :, : self.kv_len], v_all[:, :, : self.kv_len]

    def get_seq_length(self) -> int:
        """Keys before the T new ones in the gathered [S] axis (S - T), as the model's hook expects.

        Rows differ in length; position-relative biases (ALiBi) computed from this common offset
        differ from each query's own by a per-query constant, which softmax ignores.
        """
        return self.kv_len - self.q_len

    def commit(self) -> None:
        """Record the appended tokens once the forward has written every layer."""
        for s, c in zip(self.seq_ids, self.chunks):
            self.cache._commit(s, c)
