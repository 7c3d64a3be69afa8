"""Paged KV cache: stored keys/values, masks and block accounting against contiguous references;
prefix caching (shared blocks, copy-on-write, LRU eviction) and the packed layout."""

from __future__ import annotations

import random

import pytest
import torch

from llmkit.errors import InputError
from llmkit.infer.paged_cache import OutOfBlocksError, PagedKVCache
from llmkit.model.attention import build_attn_mask

L, HKV, D, BS = 2, 2, 4, 4


def _chunks(q_lens: list[int]) -> list[list[int]]:
    return [list(range(q)) for q in q_lens]


def _append(cache: PagedKVCache, ref: dict, seq_ids: list[int], q_lens: list[int]):
    """Append random keys/values through the hook; check against per-sequence torch.cat references."""
    B, T = len(seq_ids), max(q_lens)
    batch = cache.batch(seq_ids, _chunks(q_lens))
    for layer in range(L):
        k = torch.randn(B, HKV, T, D)
        v = torch.randn(B, HKV, T, D)
        k_all, v_all = batch.update(layer, k, v)
        assert k_all.shape == (B, HKV, batch.kv_len, D)
        for b, (s, q) in enumerate(zip(seq_ids, q_lens)):
            rk, rv = ref.setdefault((s, layer), (torch.empty(HKV, 0, D), torch.empty(HKV, 0, D)))
            rk, rv = torch.cat([rk, k[b, :, :q]], 1), torch.cat([rv, v[b, :, :q]], 1)
            ref[(s, layer)] = (rk, rv)
            seen = batch.attn_mask[b, 0].any(0).nonzero().flatten()  # keys some query of the row sees
            assert seen.max() == rk.shape[1] - 1
            torch.testing.assert_close(k_all[b][:, seen], rk[:, seen], rtol=0, atol=0)
            torch.testing.assert_close(v_all[b][:, seen], rv[:, seen], rtol=0, atol=0)
    batch.commit()
    return batch


@pytest.mark.parametrize("window", [None, 3])
def test_paged_batch_matches_contiguous_cache_and_standard_mask(window):
    torch.manual_seed(0)
    cache = PagedKVCache(L, HKV, D, num_blocks=16, kv_block_size=BS, sliding_window=window)
    ref: dict = {}
    for s in range(3):
        cache.add_sequence(s)
    # prefill of different lengths in one padded batch, then a chunk, then single-token decode steps
    _append(cache, ref, [0, 1, 2], [6, 2, 3])
    _append(cache, ref, [2, 0], [4, 1])
    for _ in range(3):
        batch = _append(cache, ref, [0, 1, 2], [1, 1, 1])
    assert [cache.lengths[s] for s in (0, 1, 2)] == [10, 5, 10]
    # each row's mask equals the standard causal(+window) mask for that sequence alone, padded with False
    for b, total in enumerate([10, 5, 10]):
        want = build_attn_mask(None, 1, total, window)[0, 0]  # [1, total]
        got = batch.attn_mask[b, 0]
        assert torch.equal(got[:, :total], want)
        assert not got[:, total:].any()
    assert batch.position_ids.tolist() == [[9], [4], [9]]


def test_padded_rows_get_positions_and_masks_of_their_own_length():
    cache = PagedKVCache(L, HKV, D, num_blocks=8, kv_block_size=BS)
    cache.add_sequence(7)
    cache.add_sequence(8)
    batch = cache.batch([7, 8], _chunks([5, 2]))
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 1, 1, 1]]
    want = build_attn_mask(None, 2, 2)[0, 0]
    assert torch.equal(batch.attn_mask[1, 0, :2, :2], want)
    assert not batch.attn_mask[1, 0, :, 2:].any()


def _check_pool(cache: PagedKVCache) -> None:
    """Refcounts equal the block-table references; referenced, evictable and free blocks partition the pool."""
    refs: dict[int, int] = {}
    for t in cache.block_tables.values():
        for b in t:
            if b is not None:
                refs[b] = refs.get(b, 0) + 1
    assert all(cache.pool.ref[b] == n for b, n in refs.items())
    assert sum(cache.pool.ref) == sum(refs.values())
    free = set(cache.pool._free) | set(cache.pool.lru)
    assert not free & set(refs) and len(free) + len(refs) == cache.num_blocks


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_blocks_return_to_the_pool_after_many_sequences(prefix_caching):
    rng = random.Random(0)
    cache = PagedKVCache(L, HKV, D, num_blocks=20, kv_block_size=BS, prefix_caching=prefix_caching)
    live: list[int] = []
    hits = 0
    for s in range(200):
        prompt = [rng.randint(0, 2) for _ in range(rng.randint(1, 30))]  # few distinct prefixes: many hits
        while cache.blocks_needed(len(prompt)) > cache.num_free_blocks:
            cache.free_sequence(live.pop(rng.randrange(len(live))))
        hits += cache.add_sequence(s, prompt)
        live.append(s)
        rest = prompt[cache.lengths[s]:]
        cache.batch([s], [rest]).commit()
        assert cache.tokens[s] == prompt
        _check_pool(cache)
    assert (hits > 0) == prefix_caching and cache.prefix_hits == hits
    for s in live:
        cache.free_sequence(s)
    assert cache.num_free_blocks == 20 and not cache.block_tables
    _check_pool(cache)


def test_prefix_blocks_are_shared_copied_on_write_and_evicted_lru():
    torch.manual_seed(0)
    cache = PagedKVCache(L, HKV, D, num_blocks=8, kv_block_size=BS, prefix_caching=True)
    a = list(range(10, 20))  # 2 full blocks + 2 tokens
    assert cache.add_sequence(0, a) == 0
    batch = cache.batch([0], [a])
    kv = [(torch.randn(1, HKV, 10, D), torch.randn(1, HKV, 10, D)) for _ in range(L)]
    for layer, (k, v) in enumerate(kv):
        batch.update(layer, k, v)
    batch.commit()
    assert len(cache.pool.cached) == 2  # the 2 full blocks are named; the partial one is not
    # same first 8 tokens: both full blocks are shared, only the rest is prefilled
    b = a[:8] + [99, 98, 97]
    assert cache.add_sequence(1, b) == 8
    assert cache.block_tables[1] == cache.block_tables[0][:2]
    assert [cache.pool.ref[x] for x in cache.block_tables[0]] == [2, 2, 1]
    # a different first block shares nothing (the hash chains over the whole prefix)
    assert cache.add_sequence(2, [0] + a[1:8] + [5]) == 0
    # a LoRA adapter's keys differ for the same tokens: another cache key
    assert cache.add_sequence(3, a, extra_key="adapter-x") == 0
    for s in (2, 3):
        cache.free_sequence(s)
    # the whole prompt is cached: the last token is recomputed into a copy of the shared block
    c = a[:8]
    assert cache.add_sequence(4, c) == 7
    shared = cache.block_tables[4][1]
    assert cache.blocks_to_append(4, 1) == 1  # the copy
    batch = cache.batch([4], [[c[-1]]])
    assert cache.block_tables[4][1] != shared and cache.block_tables[4][0] == cache.block_tables[0][0]
    k_new = torch.randn(1, HKV, 1, D)
    for layer in range(L):
        k_all, _ = batch.update(layer, k_new, k_new)
        torch.testing.assert_close(k_all[0, :, :7], kv[layer][0][0, :, :7], rtol=0, atol=0)  # copied keys
        torch.testing.assert_close(k_all[0, :, 7], k_new[0, :, 0], rtol=0, atol=0)
    batch.commit()
    k_a, _ = cache.batch([0], [[1]]).update(0, torch.zeros(1, HKV, 1, D), torch.zeros(1, HKV, 1, D))
    torch.testing.assert_close(k_a[0, :, :10], kv[0][0][0], rtol=0, atol=0)  # the original was not written
    _check_pool(cache)
    # released blocks stay cached (evictable, counted free) until the pool needs them: the least
    # recently released go first, and a sequence's tail before its head
    for s in (0, 1, 4):
        cache.free_sequence(s)
    _check_pool(cache)
    assert cache.num_free_blocks == 8 and len(cache.pool.cached) == 2
    assert cache.add_sequence(5, a) == 8  # still cached
    cache.free_sequence(5)
    cache.add_sequence(6)
    cache.batch([6], [list(range(4 * 7))]).commit()  # 7 of 8 blocks: one cached block is evicted
    assert cache.pool.evictions == 1 and len(cache.pool.cached) == 1 + 7  # its own 7 full blocks are named too
    assert cache.add_sequence(7, a) == 4  # the head block survived, the tail was evicted
    _check_pool(cache)


def test_rollback_forgets_tokens_and_never_overwrites_a_cached_block():
    torch.manual_seed(0)
    cache = PagedKVCache(L, HKV, D, num_blocks=8, kv_block_size=BS, prefix_caching=True)
    cache.add_sequence(0, [1, 2, 3])
    k = torch.randn(1, HKV, 6, D)
    batch = cache.batch([0], [[1, 2, 3, 9, 9, 9]])  # 3 tokens + a 3-token draft: fills block 0
    batch.update(0, k, k)
    batch.commit()
    named = cache.block_tables[0][0]
    assert cache.pool.hash_of[named] == cache.hashes[0][0]
    cache.rollback(0, 3)  # the draft was rejected after its first token
    assert cache.lengths[0] == 3 and cache.tokens[0] == [1, 2, 3] and cache.hashes[0] == []
    k2 = torch.randn(1, HKV, 1, D)
    batch = cache.batch([0], [[7]])  # rewriting position 3 copies the named block first
    k_all, _ = batch.update(0, k2, k2)
    batch.commit()
    assert cache.block_tables[0][0] != named
    torch.testing.assert_close(k_all[0, :, :3], k[0, :, :3], rtol=0, atol=0)
    torch.testing.assert_close(k_all[0, :, 3], k2[0, :, 0], rtol=0, atol=0)
    assert cache.add_sequence(1, [1, 2, 3, 9, 5]) == 4  # the drafted prefix's keys are still right for it
    assert cache.add_sequence(2, [1, 2, 3, 7, 5]) == 4  # and the accepted one's too
    _check_pool(cache)


def test_errors_name_the_problem():
    cache = PagedKVCache(L, HKV, D, num_blocks=2, kv_block_size=BS)
    cache.add_sequence(0)
    with pytest.raises(InputError, match="already in the KV cache"):
        cache.add_sequence(0)
    with pytest.raises(OutOfBlocksError, match="need 3 KV blocks but only 2 of 2 are free"):
        cache.batch([0], [list(range(9))])
    with pytest.raises(InputError, match="kv_block_size must be >= 1"):
        PagedKVCache(L, HKV, D, num_blocks=2, kv_block_size=0)


def test_sliding_window_frees_out_of_window_blocks_and_keeps_the_window_exact():
    torch.manual_seed(0)
    W, chunk = 5, 3
    cache = PagedKVCache(1, HKV, D, num_blocks=12, kv_block_size=2, sliding_window=W)
    cache.add_sequence(0)
    held = cache.blocks_needed(W - 1 + chunk) + 1
    assert held == 5 < cache.blocks_needed(60)
    keys = torch.empty(HKV, 0, D)
    for q in [3, 3, 1] + [1] * 40:
        k = torch.randn(1, HKV, q, D)
        batch = cache.batch([0], [list(range(q))])
        k_all, _ = batch.update(0, k, k)
        batch.commit()
        keys = torch.cat([keys, k[0]], 1)
        n = keys.shape[1]
        want = build_attn_mask(None, q, n, W)[0, 0]
        got = batch.attn_mask[0, 0, :, :n]
        assert torch.equal(got, want)  # same window as the model's own mask
        visible = got.any(0).nonzero().flatten()  # keys some query may see: still stored exactly
        torch.testing.assert_close(k_all[0][:, visible], keys[:, visible], rtol=0, atol=0)
        live = [b for b in cache.block_tables[0] if b is not None]
        assert len(live) <= held
    assert cache.num_free_blocks == 12 - len(live)
    cache.free_sequence(0)
    assert cache.num_free_blocks == 12
