"""Pruning (magnitude, Wanda, SparseGPT, 2:4) and low-rank factorisation: exact sparsity counts,
Wanda's mask against a hand computation on transformers' own activations, SparseGPT against Wanda
on its layer objective, pruned / merged folders in transformers, full-rank logits, energy ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_infer_fixtures import byte_level_bpe, hf_checkpoint
from tokenizers import Tokenizer as RawTokenizer

import llmkit
from llmkit.cli import main
from llmkit.errors import ConfigError, InputError
from llmkit.model.lowrank import LowRankLinear, lowrank_model
from llmkit.model.prune import hf_parts, prune_model, prune_targets, sparsegpt, wanda_score
from llmkit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pmodel")
    raw = RawTokenizer.from_str(byte_level_bpe().to_str())
    tok = Tokenizer(raw, {"eos_token": "<|endoftext|>"})
    tok.save(folder)
    hf_checkpoint("llama", folder, vocab_size=tok.vocab_size, max_position_embeddings=256, initializer_range=0.1)
    return folder


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text("To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer. " * 20)
    return f


def _calib(model_dir, calib_file):
    from llmkit.compress.calibration import load_calibration

    return load_calibration(calib_file, llmkit.load_tokenizer(model_dir), 4, 32)


def _hf(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _inputs_of(module, run) -> torch.Tensor:
    """The inputs [tokens, in_features] `module` sees while `run()` runs (a forward pre-hook, no grad)."""
    seen = []
    h = module.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad():
            run()
    finally:
        h.remove()
    return torch.cat(seen)


def test_magnitude_zeroes_exactly_the_smallest_of_each_transformers_linear(model_dir):
    """Per Linear of the Hugging Face model (q, k, v, o, gate, up, down: llmkit's fused [q; k; v] and
    [gate; up] count as their parts, as in the papers' magnitude baseline), the round(s * numel)
    smallest |W| are zeroed and the rest is untouched."""
    m = llmkit.load_model(model_dir)
    before = {n: m.get_submodule(n).weight.detach().clone() for n in prune_targets(m)}
    fractions = prune_model(m, "magnitude", 0.3)
    assert set(fractions) == set(before) and len(before) == 2 * 4  # qkv, proj, fc, mlp.proj per block
    hf = _hf(model_dir)
    for i, lay in enumerate(hf.model.layers):
        b = m.blocks[i]
        ours = {"q": b.attn.qkv.weight, "o": b.attn.proj.weight, "gate": b.mlp.fc.weight, "down": b.mlp.proj.weight}
        q, k, v = (lay.self_attn.q_proj.weight, lay.self_attn.k_proj.weight, lay.self_attn.v_proj.weight)
        g, u = lay.mlp.gate_proj.weight, lay.mlp.up_proj.weight
        hand = {"q": [q, k, v], "o": [lay.self_attn.o_proj.weight], "gate": [g, u], "down": [lay.mlp.down_proj.weight]}
        for key, linears in hand.items():
            masks = []
            for w0 in linears:
                w0 = w0.detach()
                thresh = w0.abs().flatten().sort().values[round(0.3 * w0.numel()) - 1]
                masks.append(w0.abs() <= thresh)  # ties have probability zero in random weights
                assert int(masks[-1].sum()) == round(0.3 * w0.numel())
            zero = ours[key] == 0
            assert torch.equal(zero, torch.cat(masks))
            w0 = torch.cat([w.detach() for w in linears])
            torch.testing.assert_close(ours[key][~zero], w0[~zero], rtol=0, atol=0)  # the rest untouched
    assert torch.count_nonzero(m.lm_head.weight) == m.lm_head.weight.numel()


def test_wanda_mask_equals_hand_computation_on_transformers_activations(model_dir, calib_file):
    """Per output row, the k lowest |W_ij| * ||X_j||_2, X_j = input channel j of the Linear over every
    calibration token (the post-norm input of q/k/v, the SwiGLU product for down_proj); block 1's
    inputs come from the model whose block 0 is already pruned (the paper's sequential order)."""
    calib = _calib(model_dir, calib_file)
    hf = _hf(model_dir)
    m = llmkit.load_model(model_dir)
    prune_model(m, "wanda", 0.5, calib)
    for i in range(len(hf.model.layers)):
        lay = hf.model.layers[i]
        linears = {"q": lay.self_attn.q_proj, "k": lay.self_attn.k_proj, "v": lay.self_attn.v_proj,
                   "o": lay.self_attn.o_proj, "gate": lay.mlp.gate_proj, "up": lay.mlp.up_proj,
                   "down": lay.mlp.down_proj}
        seen: dict[str, list] = {n: [] for n in linears}
        hooks = [mod.register_forward_pre_hook(lambda _m, a, n=n, s=seen: s[n].append(a[0].reshape(-1, a[0].shape[-1])))
                 for n, mod in linears.items()]
        with torch.no_grad():
            for row in calib:
                hf(row[None])
        for h in hooks:
            h.remove()
        hand = {}
        for n, lin in linears.items():
            X = torch.cat(seen[n]).double()  # [tokens, in]
            W = lin.weight.detach().double()  # [out, in]
            norms = [float(np.sqrt(sum(float(v) ** 2 for v in X[:, j]))) for j in range(W.shape[1])]
            k = round(0.5 * W.shape[1])
            mask = torch.zeros_like(W, dtype=torch.bool)
            for r in range(W.shape[0]):  # per output row: the k lowest |W_rj| * ||X_j||
                scores = sorted((abs(float(W[r, j])) * norms[j], j) for j in range(W.shape[1]))
                for _, j in scores[:k]:
                    mask[r, j] = True
            hand[n] = mask
            if n == "down" and i == 0:
                torch.testing.assert_close(wanda_score(W, X.norm(dim=0)),
                                           W.abs() * torch.tensor(norms, dtype=W.dtype)[None])
        b = m.blocks[i]
        assert torch.equal(b.attn.qkv.weight == 0, torch.cat([hand["q"], hand["k"], hand["v"]]))
        assert torch.equal(b.attn.proj.weight == 0, hand["o"])
        assert torch.equal(b.mlp.fc.weight == 0, torch.cat([hand["gate"], hand["up"]]))
        assert torch.equal(b.mlp.proj.weight == 0, hand["down"])
        with torch.no_grad():  # prune this HF layer by the hand masks: the next layer sees it pruned
            for n, lin in linears.items():
                lin.weight.masked_fill_(hand[n], 0)


def test_sparsegpt_beats_wanda_beats_magnitude_on_the_layer_objective():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    # LLM-like inputs: a few outlier features (x5) and a shared component across features
    X = torch.randn(256, 64) * (1 + 4 * (torch.rand(64) < 0.1)) + 0.5 * torch.randn(256, 1)
    H = X.t() @ X / X.shape[0]
    Ws = sparsegpt(W, H, 0.5)
    assert int((Ws == 0).sum()) == 32 * 32  # exactly half of the layer (one threshold per column block)
    score = W.abs() * X.norm(dim=0)  # Wanda, written out
    Ww = W.masked_fill(score <= score.median(1, True).values, 0)
    Wm = W.masked_fill(W.abs() <= W.abs().flatten().median(), 0)
    err = {k: float((X @ (W - v).t()).norm()) for k, v in {"sparsegpt": Ws, "wanda": Ww, "magnitude": Wm}.items()}
    assert err["sparsegpt"] < 0.95 * err["wanda"] and err["wanda"] < 0.8 * err["magnitude"], err


def test_2_4_and_sparsegpt_cli_folders_load_in_transformers(model_dir, calib_file, tmp_path, capsys):
    for method, extra in (("2:4", []), ("sparsegpt", ["--sparsity", "0.6"])):
        out = tmp_path / method.replace(":", "_")
        rc = main(["prune", "--model", str(model_dir), "--method", method, *extra, "--calib", str(calib_file),
                   "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(out)])
        assert rc == 0 and "zero" in capsys.readouterr().out
        assert "lowrank" not in json.loads((out / "config.json").read_text())
        m = llmkit.load_model(out)
        for n in prune_targets(m):
            w = m.get_submodule(n).weight
            if method == "2:4":  # every group of 4 consecutive inputs holds exactly 2 zeros
                per_group = (w.view(w.shape[0], -1, 4) == 0).sum(-1)
                assert torch.equal(per_group, torch.full_like(per_group, 2))
            else:
                # the paper's code: per block of 128 columns, 60% of each Linear's (q, k, v, ...) weights
                want = sum(round(0.6 * rows * len(range(c, min(c + 128, w.shape[1]))))
                           for rows in hf_parts(m, n) for c in range(0, w.shape[1], 128))
                assert int((w == 0).sum()) == want
        ids = torch.randint(0, m.config.vocab_size, (1, 12))
        with torch.no_grad():
            torch.testing.assert_close(_hf(out)(ids).logits, m(ids), rtol=1e-4, atol=1e-4)
        rc = main(["generate", "--model", str(out), "--prompt", "To be", "--temperature", "0",
                   "--max-new-tokens", "3"])
        assert rc == 0
        capsys.readouterr()


def test_prune_errors(model_dir, tmp_path, capsys):
    rc = main(["prune", "--model", str(model_dir), "--method", "wanda", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--calib" in capsys.readouterr().err
    m = llmkit.load_model(model_dir)
    with pytest.raises(ConfigError, match="sparsity"):
        prune_model(m, "magnitude", 1.5)
    with pytest.raises(ConfigError, match="method"):
        prune_model(m, "random", 0.5)


def test_lowrank_full_rank_reproduces_logits_and_round_trips(model_dir, tmp_path, capsys):
    m = llmkit.load_model(model_dir)
    ids = torch.randint(0, m.config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = m(ids)
        ranks = lowrank_model(m, rank=10_000)
        assert all(r == 64 for r in ranks.values()) and isinstance(m.blocks[0].mlp.fc, LowRankLinear)
        torch.testing.assert_close(m(ids), ref, rtol=1e-4, atol=1e-4)
    rc = main(["lowrank", "--model", str(model_dir), "--rank", "8", "--out", str(tmp_path / "r8")])
    assert rc == 0 and "parameters" in capsys.readouterr().out
    assert json.loads((tmp_path / "r8" / "config.json").read_text())["lowrank"]["modules"]["blocks.0.attn.qkv"] == {
        "rank": 8}
    r8 = llmkit.load_model(tmp_path / "r8")
    assert r8.blocks[1].attn.proj.rank == 8 and r8.num_params() < m.num_params()
    same = llmkit.load_model(model_dir)
    lowrank_model(same, rank=8)
    with torch.no_grad():
        torch.testing.assert_close(r8(ids), same(ids))
    assert len(llmkit.generate(r8, [1, 2, 3], 4)) == 4
    # merge: a dense folder transformers reads, with the low-rank model's logits
    rc = main(["lowrank", "merge", "--model", str(tmp_path / "r8"), "--out", str(tmp_path / "dense")])
    assert rc == 0
    assert "lowrank" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "dense")(ids).logits, r8(ids), rtol=1e-4, atol=1e-4)
    rc = main(["lowrank", "merge", "--model", str(model_dir), "--out", str(tmp_path / "no")])
    assert rc == 2 and "no low-rank" in capsys.readouterr().err
    rc = main(["lowrank", "--model", str(model_dir), "--out", str(tmp_path / "no")])
    assert rc == 2 and "--rank" in capsys.readouterr().err


def test_lowrank_energy_picks_the_hand_svd_rank(model_dir):
    m = llmkit.load_model(model_dir)
    w = m.blocks[0].mlp.proj.weight.detach().double().numpy()  # [64, 128]
    s = np.linalg.svd(w, compute_uv=False)
    total, acc, hand = float((s**2).sum()), 0.0, None
    for i, v in enumerate(s):  # smallest r keeping 90% of sum S^2
        acc += float(v) ** 2
        if acc / total >= 0.9:
            hand = i + 1
            break
    ranks = lowrank_model(m, energy=0.9, only_smaller=False)
    assert ranks["blocks.0.mlp.proj"] == hand
    with pytest.raises(InputError, match="already low-rank"):
        lowrank_model(m, rank=4)
    with pytest.raises(ConfigError, match="exactly one"):
        lowrank_model(llmkit.load_model(model_dir), rank=4, energy=0.5)


def test_channel_pruning_writes_a_smaller_model_transformers_loads(model_dir, calib_file, tmp_path, capsys):
    calib = _calib(model_dir, calib_file)
    hf = _hf(model_dir)
    down = hf.model.layers[1].mlp.down_proj
    X = _inputs_of(down, lambda: [hf(row[None]) for row in calib])
    score = X.norm(dim=0) * down.weight.detach().norm(dim=0)  # ||X_c|| * ||W_down[:, c]||, by hand
    hand_keep = sorted(int(i) for i in torch.argsort(score, descending=True)[:96])  # 128 - 25%
    out = tmp_path / "ch25"
    rc = main(["prune", "--model", str(model_dir), "--method", "channels", "--sparsity", "0.25", "--calib",
               str(calib_file), "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(out)])
    assert rc == 0
    capsys.readouterr()
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 96
    small = _hf(out)
    assert small.model.layers[1].mlp.down_proj.weight.shape == (64, 96)
    torch.testing.assert_close(small.model.layers[1].mlp.down_proj.weight, down.weight[:, hand_keep])
    torch.testing.assert_close(small.model.layers[1].mlp.gate_proj.weight,
                               hf.model.layers[1].mlp.gate_proj.weight[hand_keep])
    m = llmkit.load_model(out)
    assert m.num_params() == sum(p.numel() for p in small.parameters())
    ids = torch.randint(0, m.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, m(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv", [4, 2])  # MHA: heads go with their keys/values; GQA: query heads per group
def test_head_pruning_writes_a_smaller_model_transformers_loads(model_dir, calib_file, tmp_path, kv):
    from test_infer_fixtures import hf_checkpoint as make

    src = tmp_path / "src"
    src.mkdir()
    make("llama", src, vocab_size=llmkit.load_tokenizer(model_dir).vocab_size, max_position_embeddings=256,
         initializer_range=0.1, num_key_value_heads=kv)
    llmkit.load_tokenizer(model_dir).save(src)
    calib = _calib(model_dir, calib_file)
    hf = _hf(src)
    o = hf.model.layers[0].self_attn.o_proj
    X = _inputs_of(o, lambda: [hf(row[None]) for row in calib])  # [tokens, 4 heads * 16]
    score = (X.norm(dim=0) * o.weight.detach().norm(dim=0)).view(4, 16).sum(1)  # per head, by hand
    if kv == 4:  # the 2 best heads of 4
        keep = sorted(int(i) for i in torch.topk(score, 2).indices)
    else:  # the best query head of each KV group of 2
        keep = [int(torch.argmax(score[g * 2:(g + 1) * 2])) + 2 * g for g in range(2)]
    out = tmp_path / "h50"
    rc = main(["prune", "--model", str(src), "--method", "heads", "--sparsity", "0.5", "--calib", str(calib_file),
               "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(out)])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 2 if kv == 4 else 2, 16)
    small = _hf(out)
    cols = torch.cat([torch.arange(16) + 16 * k for k in keep])
    torch.testing.assert_close(small.model.layers[0].self_attn.o_proj.weight, o.weight[:, cols])
    torch.testing.assert_close(small.model.layers[0].self_attn.q_proj.weight,
                               hf.model.layers[0].self_attn.q_proj.weight[cols])
    m = llmkit.load_model(out)
    assert m.num_params() == sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, m.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, m(ids), rtol=1e-4, atol=1e-4)
    assert len(llmkit.generate(m, [1, 2, 3], 4)) == 4  # the KV cache follows the new head counts


def test_layer_pruning_drops_the_lowest_block_influence(model_dir, calib_file, tmp_path, capsys):
    calib = _calib(model_dir, calib_file)
    hf = _hf(model_dir)
    io = {}
    hooks = [layer.register_forward_hook(lambda m, a, kw, out, i=i: io.setdefault(i, []).append(
        (kw.get("hidden_states", a[0] if a else None), out[0] if isinstance(out, tuple) else out)), with_kwargs=True)
        for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        for row in calib:
            hf(row[None])
    for h in hooks:
        h.remove()
    bi = [1 - float(torch.cat([torch.nn.functional.cosine_similarity(x, y, dim=-1).flatten() for x, y in io[i]]).mean())
          for i in range(2)]  # ShortGPT's Block Influence, from transformers' layers
    gone = int(np.argmin(bi))
    out = tmp_path / "l50"
    rc = main(["prune", "--model", str(model_dir), "--method", "layers", "--sparsity", "0.5", "--calib",
               str(calib_file), "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(out)])
    assert rc == 0 and "blocks" in capsys.readouterr().out
    small = _hf(out)
    assert small.config.num_hidden_layers == 1
    kept = hf.model.layers[1 - gone]
    torch.testing.assert_close(small.model.layers[0].mlp.down_proj.weight, kept.mlp.down_proj.weight)
    m = llmkit.load_model(out)
    ids = torch.randint(0, m.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, m(ids), rtol=1e-4, atol=1e-4)
    rc = main(["prune", "--model", str(model_dir), "--method", "layers", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--calib" in capsys.readouterr().err


def test_asvd_beats_plain_svd_on_activation_weighted_error(model_dir, calib_file, tmp_path):
    from llmkit.model.lowrank import asvd_scales

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    # LLM-like inputs: a few input channels carry large activations
    X = torch.randn(512, 64) * (1 + 9 * (torch.arange(64) % 16 == 0))
    s = X.abs().mean(0) ** 0.5  # ASVD's scales, written out
    for r in (4, 8, 16):
        plain, aware = LowRankLinear.from_linear(lin, r), LowRankLinear.from_linear(lin, r, s)
        with torch.no_grad():
            e_plain = float((X @ (lin.weight - plain.up.weight @ plain.down.weight).t()).norm())
            e_aware = float((X @ (lin.weight - aware.up.weight @ aware.down.weight).t()).norm())
            w_err = [float((lin.weight - m.up.weight @ m.down.weight).norm()) for m in (plain, aware)]
        assert e_aware < 0.9 * e_plain, (r, e_aware, e_plain)
        assert w_err[0] <= w_err[1] + 1e-5  # plain SVD stays the best in plain Frobenius norm (Eckart-Young)
    # on a model: the scales are mean |X_j|^0.5 of the layer's calibration inputs, and the CLI folder loads
    calib = _calib(model_dir, calib_file)
    m = llmkit.load_model(model_dir)
    X = _inputs_of(m.blocks[0].mlp.proj, lambda: m(calib))
    sc = asvd_scales(m, ["blocks.0.mlp.proj"], calib)["blocks.0.mlp.proj"]
    torch.testing.assert_close(sc, X.abs().mean(0) ** 0.5)
    rc = main(["lowrank", "--model", str(model_dir), "--rank", "8", "--calib", str(calib_file), "--calib-samples",
               "4", "--calib-seq-len", "32", "--out", str(tmp_path / "asvd")])
    assert rc == 0
    a = llmkit.load_model(tmp_path / "asvd")
    assert a.blocks[0].mlp.proj.rank == 8


def test_compress_report_table_matches_transformers(model_dir, calib_file, tmp_path, capsys):
    pruned = tmp_path / "mag50"
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--out",
                 str(pruned)]) == 0
    rc = main(["compress", "report", "--model", str(model_dir), "--variants", str(pruned), "--data", str(calib_file),
               "--max-tokens", "200", "--seq-len", "64", "--new-tokens", "8", "--repeats", "1", "--out",
               str(tmp_path / "rep")])
    assert rc == 0 and "| variant | size (MB) |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000
    assert "mag50" in (tmp_path / "rep" / "report.md").read_text()
    ids = llmkit.load_tokenizer(model_dir).encode(calib_file.read_text())[:200]
    for row, folder in zip(rows, (model_dir, pruned), strict=True):
        hf = _hf(folder)
        nll, n = 0.0, 0
        with torch.no_grad():  # the same non-overlapping 64-token windows, scored by transformers
            for b in range(0, len(ids), 64):
                x = torch.tensor(ids[b : b + 64])[None]
                if x.shape[1] < 2:
                    break
                out = hf(x, labels=x)
                nll, n = nll + float(out.loss) * (x.shape[1] - 1), n + x.shape[1] - 1
        assert row["perplexity"] == pytest.approx(float(np.exp(nll / n)), rel=1e-4)
        assert row["parameters"] == sum(p.numel() for p in hf.parameters())
        assert row["decode_tokens_per_s"] > 0 and row["peak_memory_mb"] > 0 and row["size_mb"] > 0
    assert rows[0]["sparsity"] == 0 and rows[1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    rc = main(["compress", "report", "--model", str(model_dir), "--variants", str(tmp_path / "nope"), "--out",
               str(tmp_path / "rep2")])
    assert rc == 2 and "not a model folder" in capsys.readouterr().err
