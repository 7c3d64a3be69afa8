"""llmkit's fp32 CPU kernels for a decode step (model/kernels.py) against fp64 references: the few-row
matmul PackedLinear runs, RMSNorm and one-query attention, on every vector path (AVX-512, AVX2, plain C)."""

import platform
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.model import kernels
from llmkit.model.layers import RMSNorm
from llmkit.model.linear import PackedLinear

MARCHES = ["native", "x86-64-v3", "x86-64"] if platform.machine() in ("x86_64", "AMD64") else ["native"]
needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="no C compiler: llmkit's kernels cannot be built")


@needs_cc
@pytest.mark.parametrize("march", MARCHES)
def test_fp32_kernels_match_fp64(march):
    lib = kernels.build(march)
    assert lib is not None
    g = torch.Generator().manual_seed(0)
    for M, N, K in [(1, 37, 19), (2, 64, 100), (3, 5, 1376), (1, 300, 512)]:  # K tails of every vector width
        x, w, b = (torch.randn(*s, generator=g) for s in ((M, K), (N, K), (N,)))
        for bias in (None, b):
            ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
            torch.testing.assert_close(kernels.f32_mm(x, w, bias, lib), ref.float(), rtol=1e-4, atol=1e-4)
    x, w = torch.randn(3, 1, 70, generator=g), torch.rand(70, generator=g)
    for offset in (0.0, 1.0):  # Gemma's (1 + w)
        h = x.double()
        ref = h / (h.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * (offset + w.double())
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6, offset, lib), ref.float(), rtol=1e-5, atol=1e-5)
    for B, H, Hkv, S, D in [(1, 8, 8, 100, 64), (2, 6, 2, 37, 24), (1, 4, 1, 1, 8)]:  # MHA, GQA, MQA
        cache_k, cache_v = torch.randn(2, B, Hkv, 128, D, generator=g)
        k, v = cache_k.narrow(2, 0, S), cache_v.narrow(2, 0, S)  # static-cache views
        q = torch.randn(B, H, 1, D, generator=g)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True, scale=0.3)
        torch.testing.assert_close(kernels.decode_attention(q, k, v, 0.3, lib), ref.float(), rtol=1e-4, atol=1e-5)


@needs_cc
def test_decode_layers_take_the_kernels_and_fall_back_without_them(monkeypatch):
    """PackedLinear (<= KERNEL_ROWS rows) and RMSNorm run the kernels in inference and give F.linear's /
    the formula's values; with LLMKIT_NO_KERNELS=1 (no compiler) they run PyTorch and agree."""
    torch.manual_seed(0)
    dense = nn.Linear(300, 130)
    lin, norm = PackedLinear(dense), RMSNorm(300, 1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(1, 2, 300)
    with torch.inference_mode():
        y = lin(x)
        assert lin._copy("kernel") is not None  # the kernel's copy: 156 KB, so the weight as it is
        torch.testing.assert_close(y, F.linear(x.double(), dense.weight.double(), dense.bias.double()).float())
        ref = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.weight
        torch.testing.assert_close(norm(x), ref)
        monkeypatch.setenv("LLMKIT_NO_KERNELS", "1")
        lin2, norm2 = PackedLinear(dense), RMSNorm(300, 1e-5)
        norm2.weight = norm.weight
        assert lin2._copy("kernel") is None
        torch.testing.assert_close(lin2(x), y)
        torch.testing.assert_close(norm2(x), ref)


def test_huge_copy_is_an_equal_aligned_copy():
    big = torch.randn(600, 512)  # 1.2 MB: copied into 2 MB pages
    c = kernels.huge_copy(big)
    assert torch.equal(c, big) and c.data_ptr() != big.data_ptr()
    if platform.system() == "Linux":
        assert c.data_ptr() % kernels.HUGE == 0
    small = torch.randn(10, 10)
    assert kernels.huge_copy(small) is small  # under 1 MB: as it is


@needs_cc
def test_rope_and_swiglu_kernels_match_the_torch_forms():
    from llmkit.model.positions import apply_rope

    lib = kernels.build()
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 1, 12, 16, generator=g).transpose(1, 2)  # [B, heads, T=1, hd] as the forward slices it
    qk = qkv[:, :8]
    cos, sin = torch.randn(2, 2, 1, 1, 16, generator=g)
    torch.testing.assert_close(kernels.rope1(qk, cos, sin, lib), apply_rope(qk, cos, sin))
    assert kernels.rope1(qk, cos[:1], sin[:1], lib) is None  # one table row broadcast over rows: not its layout
    h = torch.randn(3, 1, 2 * 37, generator=g)
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(h, lib), F.silu(gate) * up)


def test_packed_linear_follows_weights_swapped_through_data():
    """A weight replaced through `.data` (as AWQ's scale search does) is what the next call multiplies by,
    even when the allocator hands the new weight the freed one's address (the cache key's data pointer)."""
    torch.manual_seed(0)
    for rows in (1, 3):  # llmkit's kernel / oneDNN's packed copy
        lin = PackedLinear(nn.Linear(64, 96, bias=False)).eval()
        x = torch.randn(rows, 64)
        with torch.no_grad():
            for _ in range(8):
                lin.weight.data = torch.empty(0)  # the previous candidate is freed before the next is made
                lin.weight.data = torch.randn(96, 64)
                torch.testing.assert_close(lin(x), x @ lin.weight.t(), rtol=1e-5, atol=1e-5)
@needs_cc
def test_decode_attention_step_writes_the_cache_and_attends_like_torch():
    """One C call from the fused projection to the attention output on a static cache: the rotated k and the v
    land in the cache's next column, and y equals apply_rope + SDPA over the cached keys (MHA and GQA, B = 2)."""
    from llmkit.infer.kv_cache import StaticKVCache
    from llmkit.model.positions import apply_rope

    lib = kernels.build()
    g = torch.Generator().manual_seed(2)
    for H, Hkv, D in [(4, 4, 16), (6, 2, 8)]:
        B, past = 2, 5
        cache = StaticKVCache(1, B, Hkv, D, 16)
        cache.update(0, *torch.randn(2, B, Hkv, past, D, generator=g))  # 5 cached positions
        qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, generator=g)
        cos, sin = torch.randn(2, B, 1, 1, D, generator=g)
        old_k, old_v = cache.k[0][:, :, :past].clone(), cache.v[0][:, :, :past].clone()
        y = kernels.decode_attention_step(qkv, cos, sin, cache, 0, H, Hkv, 0.3, lib)
        heads = qkv.view(B, 1, H + 2 * Hkv, D).transpose(1, 2)
        qk = apply_rope(heads[:, : H + Hkv], cos, sin)
        k = torch.cat([old_k, qk[:, H:]], 2)
        v = torch.cat([old_v, heads[:, H + Hkv :]], 2)
        assert cache.length == past + 1
        torch.testing.assert_close(cache.k[0][:, :, : past + 1], k)
        torch.testing.assert_close(cache.v[0][:, :, : past + 1], v)
        ref = F.scaled_dot_product_attention(qk[:, :H].double(), k.double(), v.double(), enable_gqa=True, scale=0.3)
        torch.testing.assert_close(y, ref.transpose(1, 2).reshape(B, 1, H * D).float(), rtol=1e-4, atol=1e-5)


@needs_cc
@pytest.mark.parametrize("march", MARCHES)
def test_add_rms_norm_and_argmax_match_torch(march):
    """The residual add + RMSNorm in one call equals the add then the norm; the greedy pass equals
    torch.max (values and first maximal indices, ties included) and declines rows with a NaN."""
    lib = kernels.build(march)
    g = torch.Generator().manual_seed(3)
    x, h = torch.randn(2, 1, 70, generator=g), torch.randn(2, 1, 70, generator=g)
    w = torch.rand(70, generator=g)
    xo, y = kernels.add_rms_norm(x, h, w, 1e-6, 1.0, lib)
    torch.testing.assert_close(xo, x + h, rtol=0, atol=0)
    torch.testing.assert_close(y, kernels.rms_norm(x + h, w, 1e-6, 1.0, lib), rtol=0, atol=0)
    logits = torch.randn(3, 1000, generator=g)
    logits[1, 17] = logits[1, 900] = 50.0  # a tie: the first index wins
    logits[2, 999] = 60.0  # in the scalar tail
    val, idx = kernels.argmax_rows(logits, lib)
    ref = logits.max(-1)
    assert idx.tolist() == ref.indices.tolist() == [int(logits[0].argmax()), 17, 999]
    assert torch.equal(val, ref.values)
    logits[0, 5] = float("nan")
    assert kernels.argmax_rows(logits, lib) is None
