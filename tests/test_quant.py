"""Quantization: Linear kinds against hand-computed dequantized matmuls, GPTQ/AWQ against RTN on their
own objective, quantized folders, W8A8/KL, QAT, the `llmkit quantize` CLI and `--quantize` on load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from test_infer_fixtures import byte_level_bpe, hf_checkpoint
from tokenizers import Tokenizer as RawTokenizer

import llmkit
from llmkit.cli import main
from llmkit.errors import ConfigError, InputError
from llmkit.model import kernels
from llmkit.model.config import ModelConfig
from llmkit.model.linear import set_decode_packing
from llmkit.model.quant import (
    FakeQuantLinear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QuantSpec,
    W8A8Linear,
    _collect,
    _output_loss,
    awq_clip,
    awq_scale,
    gptq,
    kl_threshold,
    quantized_bytes,
)
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import Tokenizer


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-2) -> bool:
    """Relative error within `tol` (PyTorch's kernels, the fallback, take bf16 activations)."""
    return bool((a - b).norm() / b.norm() < tol)


def _ref_int4(w: torch.Tensor, g: int) -> torch.Tensor:
    """Asymmetric min/max int4 per group, written out longhand (the reference for the kernels)."""
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            blk = w[r, c0 : c0 + g]
            lo, hi = min(float(blk.min()), 0.0), max(float(blk.max()), 0.0)
            scale = max(hi - lo, 1e-8) / 15
            zero = min(max(round(-lo / scale), 0), 15)
            q = torch.clamp(torch.round(blk / scale) + zero, 0, 15)
            out[r, c0 : c0 + g] = (q - zero) * scale
    return out


@pytest.mark.parametrize("K", [64, 172])  # 172: the kernel crashes unless the input is padded to 16
def test_int8_per_channel_kernel_matches_dequantized_matmul(K):
    w, b, x = torch.randn(48, K), torch.randn(48), torch.randn(2, 5, K)
    q, s, z = QuantSpec(8, 0).grid(w)
    lin = Int8Linear.from_codes(q, s, b, K, 0)
    scale = w.abs().amax(1, keepdim=True) / 127  # symmetric per row, by hand
    ref = F.linear(x, torch.clamp(torch.round(w / scale), -128, 127) * scale, b)
    assert _close(lin(x), ref)
    assert lin.qweight.dtype == torch.int8 and (w - lin.weight_float()).abs().max() <= scale.max() / 2 + 1e-6


@pytest.mark.parametrize("K,N,g", [(128, 48, 64), (172, 40, 32)])  # K not a multiple of g; N not of 16
def test_int4_kernel_matches_longhand_grid_and_state_dict_round_trip(K, N, g):
    w, x = torch.randn(N, K), torch.randn(3, K)
    q, s, z = QuantSpec(4, g).grid(w)
    lin = Int4Linear.from_codes(q, s, z, None, K, g)
    Kp = -(-K // g) * g
    ref_w = _ref_int4(F.pad(w, (0, Kp - K)), g)[:, :K]
    assert _close(lin(x), x @ ref_w.T)
    sd = lin.state_dict()
    assert sd["qweight"].dtype == torch.uint8 and sd["qweight"].shape == (N, Kp // 2)  # two codes a byte
    other = Int4Linear(K, N, False, g)
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), lin(x))
    if K % g == 0 and N % 16 == 0:  # no padding: exactly half a byte per weight
        assert lin.qweight.numel() * 2 == w.numel()


def _kernels_for(march: str):
    """llmkit's kernel library built for `march`, or a skip where this machine cannot build or run it."""
    import platform
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: llmkit's kernels cannot be built (the PyTorch fallback is tested elsewhere)")
    if march != "native" and platform.machine() != "x86_64":
        pytest.skip("-march variants are x86-64 only")
    if march == "x86-64-v3" and " avx2 " not in open("/proc/cpuinfo").read().replace("\n", " "):
        pytest.skip("this CPU has no AVX2")
    return kernels.build(march)


@pytest.mark.parametrize("march", ["native", "x86-64-v3", "x86-64"])  # AVX-512 here, AVX2, plain C
def test_llmkit_kernels_match_dequantized_fp64_matmul(march, monkeypatch):
    """llmkit's own int8/int4 kernels (int16 activations, exact int32 sums) against x @ W_deq^T in fp64,
    for each instruction set it compiles for; and the PyTorch fallback when they are off."""
    lib = _kernels_for(march)
    assert lib is not None
    torch.manual_seed(0)
    for bits, K, N, g in [(8, 172, 37, 0), (8, 256, 20, 64), (4, 192, 37, 32), (4, 256, 9, 64), (4, 512, 5, 256)]:
        w, x = torch.randn(N, K), torch.randn(3, K)
        x[1] = 0  # an all-zero row
        q, s, z = QuantSpec(bits, g).grid(w)
        lin = Int8Linear.from_codes(q, s, None, K, g) if bits == 8 else Int4Linear.from_codes(q, s, z, None, K, g)
        ref = x.double() @ lin.weight_float().double().T
        if bits == 8:
            y = kernels.int8_mm(x, F.pad(lin.qweight, (0, -(-lin.Kp // 32) * 32 - lin.Kp)), lin.scales, lib=lib)
        else:
            y = kernels.int4_mm(x, lin.qweight, lin.scales, lin.zeros, lib=lib)
        assert (y.double() - ref).norm() / ref.norm() < 2e-4, (bits, K, g, march)
        assert torch.equal(y[1], torch.zeros(N))
        if march == "native":
            assert _close(lin(x), ref.float(), 2e-4)  # the module takes the kernel path
            assert torch.equal(copy.deepcopy(lin)(x), lin(x))  # its kernel binding (raw pointers) is rebuilt
            with pytest.raises(InputError, match="features"):  # not a read past the C kernel's buffers
                lin(torch.randn(2, K + 32))
            monkeypatch.setenv("LLMKIT_NO_KERNELS", "1")  # PyTorch's kernels (bf16 activations)
            again = Int8Linear.from_codes(q, s, None, K, g) if bits == 8 else Int4Linear.from_codes(q, s, z, None, K, g)
            assert not kernels.available() and _close(again(x), ref.float())
            monkeypatch.delenv("LLMKIT_NO_KERNELS")


def _int16_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activations by hand: per row s = max|x| / 16383 (fp32), q = round-half-even(x / s) exact."""
    amax = x.abs().amax(1, keepdim=True)
    s = torch.where(amax > 0, amax / 16383, torch.ones_like(amax))
    return torch.round(x * (1 / s)).long(), s


@pytest.mark.parametrize("march", ["native", "x86-64-v3", "x86-64"])  # VNNI bytes here, AVX2 int16, plain C
def test_llmkit_kernels_sum_the_integer_products_exactly(march):
    """The integer part of llmkit's kernels is exact, whatever the instruction set: int8 per channel gives
    bit for bit the float32 of a longhand int64 sum of its int16 activations times the codes; int8 groups and
    int4 (scales and zero points per group) agree with the same integer sums to float32 rounding. Shapes cover
    row tails (N % 4), half vectors (K % 64 == 32, K % 128 != 0), sums longer than one int32 segment, 1 to 34
    groups and several rows of x (prefill)."""
    lib = _kernels_for(march)
    torch.manual_seed(0)
    for K, N, M in [(160, 7, 3), (1376, 9, 1), (2080, 5, 2)]:  # int8 per channel
        w, x = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.randn(M, K) * 3
        scales = torch.rand(N, 1) + 0.5
        q, s = _int16_rows(x)
        ref = (q @ w.long().T).float() * scales[:, 0] * s
        y = kernels.int8_mm(x, F.pad(w, (0, -K % 32)), scales, lib=lib)
        assert torch.equal(y, ref), (march, K)
    for bits, K, N, g, M in [(8, 256, 6, 32, 2), (8, 320, 5, 64, 1), (4, 160, 7, 32, 2), (4, 192, 5, 64, 1),
                             (4, 384, 6, 128, 3), (4, 512, 4, 256, 1), (4, 1088, 3, 32, 2)]:  # G = 34 > 16
        G, x = K // g, torch.randn(M, K)
        q, s = _int16_rows(x)
        scales = torch.rand(N, G) + 0.5
        if bits == 8:
            c, zero = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.zeros(N, G, dtype=torch.uint8)
            y = kernels.int8_mm(x, c, scales, lib=lib)
        else:
            c, zero = torch.randint(0, 16, (N, K), dtype=torch.uint8), torch.randint(0, 16, (N, G), dtype=torch.uint8)
            y = kernels.int4_mm(x, (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous(), scales, zero, lib=lib)
        w = c.long().view(N, G, g) - zero.long().unsqueeze(-1)  # exact integers per group
        sums = torch.einsum("mgk,ngk->mng", q.view(M, G, g), w)  # [M, N, G] int64
        ref = (sums.double() * scales.double()).sum(-1) * s.double()
        assert ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6, (march, bits, K, g)


def test_pytorch_fallback_without_llmkit_kernels(monkeypatch):
    """LLMKIT_NO_KERNELS=1 (as without a C compiler): the kinds run PyTorch's kernels, same results."""
    monkeypatch.setenv("LLMKIT_NO_KERNELS", "1")
    assert not kernels.available()
    w, x = torch.randn(24, 96), torch.randn(2, 96)
    for lin in (Int8Linear.from_codes(*QuantSpec(8, 0).grid(w)[:2], None, 96, 0),
                Int4Linear.from_codes(*QuantSpec(4, 32).grid(w), None, 96, 32)):
        assert _close(lin(x), x @ lin.weight_float().T)


def test_bad_specs_are_clear_errors():
    with pytest.raises(ConfigError, match="group_size"):
        QuantSpec(4, 16)
    model = Transformer(ModelConfig.from_preset("tiny"))
    with pytest.raises(ConfigError, match="dtype"):
        model.quantize("int3")
    with pytest.raises(InputError, match="calibration"):
        model.quantize("int4", method="gptq")
    with pytest.raises(ConfigError, match="method"):
        model.quantize("int4", method="nf4")


def _correlated(n: int, k: int) -> torch.Tensor:
    """Inputs with correlated channels and a few outlier channels (what real activations look like)."""
    base = torch.randn(n, k // 4) @ torch.randn(k // 4, k)
    base[:, :3] *= 20
    return base + 0.1 * torch.randn(n, k)


def test_gptq_beats_rtn_on_its_objective():
    w, x = torch.randn(64, 128), _correlated(512, 128)
    spec = QuantSpec(4, 64)
    H = 2 * x.T @ x / x.shape[0]

    def err(codes, s, z):
        from llmkit.model.quant import dequantize

        return (x @ (w - dequantize(codes, s, z)).T).pow(2).mean().item()

    rtn = err(*spec.grid(w))
    for act_order in (True, False):
        assert err(*gptq(w, H, spec, act_order=act_order, block_size=32)) < 0.7 * rtn


def test_awq_scales_beat_rtn_on_outlier_channels():
    w, x = torch.randn(64, 128), _correlated(256, 128)
    spec = QuantSpec(4, 64)
    s = awq_scale(w, x, spec)
    rtn = (x @ (spec.fake(w) - w).T).pow(2).mean()
    awq = ((x / s) @ spec.fake(w * s).T - x @ w.T).pow(2).mean()
    assert awq < 0.9 * rtn and not torch.allclose(s, torch.ones_like(s))


def test_awq_clip_never_raises_the_layer_output_error_over_rtn():
    torch.manual_seed(0)
    w, x = torch.randn(40, 128), _correlated(300, 128)
    w[:, 5] *= 8  # a few large weights: the grid is stretched by them, clipping pays
    spec = QuantSpec(4, 32)

    def err(clip):  # per row: ||x (W - Q(W))^T||^2, written out
        return (x @ (w - spec.fake(w, clip)).T).pow(2).sum(0)

    rtn = err(None)
    clip = awq_clip(w, x, spec)
    assert clip.shape == (40, 4) and bool(((clip >= 0.5) & (clip <= 1)).all())
    assert bool((err(clip) <= rtn * (1 + 1e-5)).all())  # row by row, never worse than RTN
    assert err(clip).sum() < 0.97 * rtn.sum() and bool((clip < 1).any())


def test_awq_scale_search_scores_the_module_the_layer_feeds():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=128)).eval()
    names = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj"]
    stats = _collect(model, names, list(torch.randint(0, 128, (3, 1, 16))), "awq", "dynamic")
    # q/k/v feed the attention output, gate/up the MLP output; the projections only themselves
    assert stats[names[0]]["parent"][0] is model.blocks[0].attn
    assert stats[names[2]]["parent"][0] is model.blocks[0].mlp
    assert "parent" not in stats[names[1]] and "parent" not in stats[names[3]]
    spec = QuantSpec(4, 32)
    for name in (names[0], names[2]):
        lin = model.get_submodule(name)
        w = lin.weight.detach().clone()
        parent, calls = stats[name]["parent"]
        loss = _output_loss(parent, lin, calls)
        with torch.no_grad():  # the loss is the module's output error, summed by hand here
            a, k = calls[0]
            ref = parent(*a, **k)
            lin.weight.data = spec.fake(w)
            by_hand = (parent(*a, **k) - ref).pow(2).sum().item()
            lin.weight.data = w
        assert loss(w) == 0.0 and torch.equal(lin.weight, w)  # restores the weight
        assert by_hand < loss(spec.fake(w))  # three calls sum more than one
        s = awq_scale(w, stats[name]["x"], spec, loss=loss)
        assert loss(spec.fake(w * s) / s) <= loss(spec.fake(w))  # s = 1 (RTN) is a candidate


def test_awq_is_the_same_on_a_model_packed_for_decode():
    # generate() swaps in PackedLinear (packed copies keyed on the weight's version and address); AWQ
    # scores candidate weights by swapping them in, so a stale copy once decided the search at random
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=128)).eval()
    calib = torch.randint(0, 128, (4, 32))
    plain = copy.deepcopy(model).quantize("int4", 32, "awq", calibration=calib)
    packed = set_decode_packing(copy.deepcopy(model))
    packed(calib[:1])  # the packed copies exist before quantizing, as after a generate() call
    packed.quantize("int4", 32, "awq", calibration=calib)
    for (name, a), b in zip(plain.state_dict().items(), packed.state_dict().values()):
        assert torch.equal(a, b), name


def test_skip_keeps_named_blocks_float_and_rejects_unknown_names(tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=128)).eval()
    ids = torch.randint(0, 128, (1, 10))
    model.quantize("int8", 32, skip=("embeddings", "blocks.0", "blocks.1.attn.qkv"))
    assert type(model.blocks[0].mlp.fc) is torch.nn.Linear and type(model.blocks[1].attn.qkv) is torch.nn.Linear
    assert isinstance(model.blocks[1].attn.proj, Int8Linear) and isinstance(model.lm_head, Int8Linear)
    model.save_pretrained(tmp_path)
    again = llmkit.load_model(tmp_path)
    assert type(again.blocks[0].attn.qkv) is torch.nn.Linear and isinstance(again.blocks[1].mlp.fc, Int8Linear)
    assert torch.allclose(again(ids), model(ids), atol=1e-5)
    with pytest.raises(InputError, match="blocks.9"):
        Transformer(ModelConfig.from_preset("tiny", vocab_size=128)).quantize("int8", skip=("blocks.9",))


def test_kl_threshold_clips_a_long_tail():
    torch.manual_seed(0)
    a = torch.cat([torch.randn(100_000).abs(), torch.tensor([40.0])])  # one outlier
    hist = torch.histc(a, 2048, 0, 40.0)
    t = kl_threshold(hist, 40.0 / 2048)
    assert 2.0 < t < 20.0  # well below the outlier, above the bulk


@pytest.mark.parametrize("preset,dtype,method", [
    ("tiny", "int8", "rtn"), ("tiny", "int4", "gptq"), ("tiny", "int4", "awq"), ("tiny", "int8", "w8a8"),
    ("moe-tiny", "int8", "rtn"), ("moe-tiny", "int4", "gptq"),
])
def test_quantized_model_round_trips_through_a_folder(tmp_path, preset, dtype, method):
    cfg = ModelConfig.from_preset(preset, vocab_size=128)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 128, (2, 12))
    ref = model(ids)
    fp_bytes = quantized_bytes(model)
    calib = torch.randint(0, 128, (4, 24))
    model.quantize(dtype, group_size=64, method=method, calibration=calib)
    kinds = {type(m) for m in model.modules()}
    assert {Int8Linear, Int4Linear, W8A8Linear} & kinds and Int8Embedding in kinds
    if preset == "moe-tiny":  # experts are quantized one by one, the router stays float
        assert not isinstance(model.blocks[0].mlp.fc_experts[0], torch.nn.Linear)
        assert type(model.blocks[0].mlp.router) is torch.nn.Linear
    out = model(ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (0.05 if dtype == "int8" else 0.3)
    model.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["quantization"]["method"] == method
    loaded = llmkit.load_model(tmp_path)
    torch.testing.assert_close(loaded(ids), out)
    assert quantized_bytes(loaded) < (0.45 if dtype == "int8" else 0.35) * fp_bytes
    # the one generation loop runs it (the model's forward; no fast-path weight copies)
    assert len(llmkit.generate(loaded, [1, 2, 3], 5)) == 5


def test_qat_fake_quant_trains_and_converts_to_the_same_grid():
    cfg = ModelConfig.from_preset("tiny", vocab_size=64)
    model = Transformer(cfg)
    model.prepare_qat("int4", 32)
    lin = model.blocks[0].attn.qkv
    assert isinstance(lin, FakeQuantLinear) and set(model.state_dict()) == set(Transformer(cfg).state_dict())
    x = torch.randn(3, 64)
    torch.testing.assert_close(lin(x), F.linear(x, QuantSpec(4, 32).fake(lin.weight)))
    ids = torch.randint(0, 64, (2, 16))
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0  # straight-through
    model.eval()
    with torch.no_grad():
        before = model(ids)
        model.quantize("int4", 32, skip=("embeddings",))
        assert _close(model(ids), before)


def test_w8a8_static_kl_scales_and_dynamic_agree_with_float():
    cfg = ModelConfig.from_preset("tiny", vocab_size=64)
    base = Transformer(cfg).eval()
    ids, calib = torch.randint(0, 64, (1, 16)), torch.randint(0, 64, (4, 32))
    ref = base(ids)
    for act in ("dynamic", "kl"):
        m = Transformer(cfg).eval()
        m.load_state_dict(base.state_dict())
        m.quantize("int8", method="w8a8", calibration=calib, act_calib=act, skip=("embeddings",))
        lin = m.blocks[0].mlp.fc
        assert isinstance(lin, W8A8Linear) and (lin.act_scale is not None) == (act == "kl")
        assert not torch.allclose(lin.smooth, torch.ones_like(lin.smooth))  # SmoothQuant migrated scale
        assert ((m(ids) - ref).norm() / ref.norm()) < 0.1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qmodel")
    raw = RawTokenizer.from_str(byte_level_bpe().to_str())
    tok = Tokenizer(raw, {"eos_token": "<|endoftext|>"})
    tok.save(folder)
    hf_checkpoint("llama", folder, vocab_size=tok.vocab_size, max_position_embeddings=256, initializer_range=0.1)
    return folder


def test_quantize_cli_writes_a_folder_load_model_reads(model_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("To be, or not to be, that is the question. " * 40)
    out = tmp_path / "q4"
    rc = main(["quantize", "--model", str(model_dir), "--dtype", "int4", "--method", "gptq", "--group-size", "32",
               "--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "32", "--skip", "lm_head",
               "--out", str(out)])
    assert rc == 0 and "MiB" in capsys.readouterr().out
    model = llmkit.load_model(out)
    assert isinstance(model.blocks[1].mlp.proj, Int4Linear) and type(model.lm_head) is torch.nn.Linear
    assert (out / "tokenizer.json").is_file()
    from llmkit.compress.calibration import load_calibration

    calib_ids = load_calibration(calib, llmkit.load_tokenizer(model_dir), 4, 32)
    assert calib_ids.shape == (4, 32)
    same = llmkit.load_model(model_dir).quantize("int4", 32, "gptq", calibration=calib_ids, skip=("lm_head",))
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    torch.testing.assert_close(model(ids), same(ids))  # the CLI is the Python API plus a folder
    rc = main(["generate", "--model", str(out), "--prompt", "To be", "--temperature", "0", "--max-new-tokens", "4"])
    assert rc == 0 and capsys.readouterr().out.strip()


def test_quantize_on_load_and_cli_errors(model_dir, tmp_path, capsys):
    m = llmkit.load_model(model_dir, quantize="int8")
    assert isinstance(m.blocks[0].attn.qkv, Int8Linear) and m.blocks[0].attn.qkv.group_size == 0
    rc = main(["generate", "--model", str(model_dir), "--quantize", "int4", "--prompt", "a", "--temperature", "0",
               "--max-new-tokens", "3"])
    assert rc == 0
    capsys.readouterr()
    rc = main(["quantize", "--model", str(model_dir), "--method", "awq", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--calib" in capsys.readouterr().err
    rc = main(["quantize", "--model", str(model_dir), "--dtype", "int4", "--group-size", "48",
               "--out", str(tmp_path / "y")])
    assert rc == 2 and "group_size" in capsys.readouterr().err


def test_int8_folder_weights_are_aligned_for_the_kernel(tmp_path):
    """safetensors hands out 8-byte-aligned tensors; the int8 kernel's vector loads crash on them."""
    cfg = ModelConfig.from_preset("llama-60m", vocab_size=256, n_layer=1)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 256, (1, 32))
    model.quantize("int8", group_size=0).save_pretrained(tmp_path)
    loaded = llmkit.load_model(tmp_path)
    assert all(b.data_ptr() % 64 == 0 for b in loaded.buffers() if b.dtype == torch.int8)
    torch.testing.assert_close(loaded(ids), model(ids))


def test_engine_serves_a_quantized_model_like_generate():
    """The continuous-batching engine (what `llmkit serve` runs) drives the quantized kinds unchanged."""
    from llmkit.infer.engine import Engine
    from llmkit.infer.sampling import SamplingParams

    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=128)).eval().quantize("int4", 32)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    with Engine(model, max_batch_size=4) as engine:
        handles = [engine.submit(p, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
                   for p in prompts]
        got = [h.result().token_ids for h in handles]
    assert got == [llmkit.generate(model, p, 6, ignore_eos=True) for p in prompts]
