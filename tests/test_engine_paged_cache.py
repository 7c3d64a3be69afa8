"""Paged KV cache: stored keys/values, masks and block accounting against contiguous references."""

from __future__ import annotations

import random

import pytest
import torch

from llmkit.errors import InputError
from llmkit.infer.paged_cache import OutOfBlocksError, PagedKVCache
from llmkit.model.attention import build_attn_mask

L, HKV, D, BS = 2, 2, 4, 4


def _append(cache: PagedKVCache, ref: dict, seq_ids: list[int], q_lens: list[int]):
    """Append random keys/values through the hook; check against per-sequence torch.cat references."""
    B, T = len(seq_ids), max(q_lens)
    batch = cache.batch(seq_ids, q_lens)
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
    for s, n in [(0, 13), (1, 5), (2, 10)]:
        cache.add_sequence(s, n)
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
    cache.add_sequence(7, 8)
    cache.add_sequence(8, 8)
    batch = cache.batch([7, 8], [5, 2])
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 1, 1, 1]]
    want = build_attn_mask(None, 2, 2)[0, 0]
    assert torch.equal(batch.attn_mask[1, 0, :2, :2], want)
    assert not batch.attn_mask[1, 0, :, 2:].any()


def test_blocks_return_to_the_free_list_after_many_sequences():
    rng = random.Random(0)
    cache = PagedKVCache(L, HKV, D, num_blocks=20, kv_block_size=BS)
    live: list[int] = []
    for s in range(200):
        n = rng.randint(1, 30)
        while not cache.can_allocate(n):
            cache.free_sequence(live.pop(rng.randrange(len(live))))
        cache.add_sequence(s, n)
        live.append(s)
        if rng.random() < 0.5:  # store some tokens: blocks move from reserved to owned
            cache.batch([s], [rng.randint(1, n)]).commit()
        owned = [b for t in cache.block_tables.values() for b in t]
        assert len(owned) == len(set(owned))  # no block is handed out twice
        assert len(owned) + sum(cache.reserved.values()) + cache.num_free_blocks == 20
    for s in live:
        cache.free_sequence(s)
    assert cache.num_free_blocks == 20 and not cache.block_tables


def test_errors_name_the_problem():
    cache = PagedKVCache(L, HKV, D, num_blocks=2, kv_block_size=BS)
    with pytest.raises(OutOfBlocksError, match="need 3 KV blocks"):
        cache.add_sequence(0, 9)
    cache.add_sequence(0, 4)
    with pytest.raises(InputError, match="already in the KV cache"):
        cache.add_sequence(0, 4)
    with pytest.raises(OutOfBlocksError, match="would hold 5 tokens but was added for 4"):
        cache.batch([0], [5])


def test_sliding_window_frees_out_of_window_blocks_and_keeps_the_window_exact():
    torch.manual_seed(0)
    W, chunk = 5, 3
    cache = PagedKVCache(1, HKV, D, num_blocks=12, kv_block_size=2, sliding_window=W, max_chunk=chunk)
    cache.add_sequence(0, 60)
    held = cache.blocks_to_reserve(60)
    assert held == 5 < cache.blocks_needed(60)  # ceil((W - 1 + chunk) / 2) + 1
    keys = torch.empty(HKV, 0, D)
    for q in [3, 3, 1] + [1] * 40:
        k = torch.randn(1, HKV, q, D)
        batch = cache.batch([0], [q])
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
        assert len(live) <= held and len(live) + cache.reserved[0] == held
    assert cache.num_free_blocks == 12 - held
    cache.free_sequence(0)
    assert cache.num_free_blocks == 12
