"""GGUF and ONNX export: tensors read back with the `gguf` reader, tokenizer metadata, llama.cpp greedy
tokens (when llama-cpp-python is installed), ONNX Runtime greedy tokens and `generate --backend onnxruntime`."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
from test_infer_fixtures import byte_level_bpe, hf_checkpoint, sentencepiece_bpe
from tokenizers import Tokenizer as RawTokenizer

import llmkit
from llmkit.cli import main
from llmkit.errors import CheckpointError, ConfigError
from llmkit.model.llama2c import unpermute_rope
from llmkit.tokenizer import CHATML_TEMPLATE, Tokenizer

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def _folder(tmp_path_factory, name: str, raw: RawTokenizer, family: str = "llama", **over):
    folder = tmp_path_factory.mktemp(name)
    tok = Tokenizer(raw, {"eos_token": "<|endoftext|>"} if "<|endoftext|>" in raw.get_vocab() else
                    {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, chat_template=CHATML_TEMPLATE)
    tok.save(folder)
    hf_checkpoint(family, folder, vocab_size=tok.vocab_size, max_position_embeddings=128, initializer_range=0.2,
                  **over)
    return folder


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return _folder(tmp_path_factory, "bpe", RawTokenizer.from_str(byte_level_bpe().to_str()))


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    return _folder(tmp_path_factory, "spm", RawTokenizer.from_str(sentencepiece_bpe().to_str()))


def _reader_tensors(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)]))
    return r, out


def _field(r, key):
    f = r.fields[key]
    if len(f.data) > 1:
        return [bytes(f.parts[i]).decode() if f.types[-1].name == "STRING" else f.parts[i][0] for i in f.data]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0].name == "STRING" else v[0]


@pytest.mark.parametrize("qtype,tol", [("f32", 0.0), ("q8_0", 0.01), ("q4_0", 0.15)])
def test_gguf_tensors_and_byte_level_tokenizer(bpe_dir, tmp_path, qtype, tol):
    out = tmp_path / f"m-{qtype}.gguf"
    assert main(["export", "gguf", "--model", str(bpe_dir), "--out", str(out), "--type", qtype]) == 0
    r, t = _reader_tensors(out)
    model = llmkit.load_model(bpe_dir)
    cfg = model.config
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    qkv = model.blocks[1].attn.qkv.weight.detach()
    # llama.cpp's interleaved q/k rows: undoing them with llama2c's importer gives our rows back
    torch.testing.assert_close(unpermute_rope(t["blk.1.attn_q.weight"], H), qkv[: H * D], atol=tol, rtol=0)
    torch.testing.assert_close(unpermute_rope(t["blk.1.attn_k.weight"], Hkv), qkv[H * D : (H + Hkv) * D],
                               atol=tol, rtol=0)
    gate = model.blocks[0].mlp.fc.weight.detach()[: cfg.intermediate_size]
    torch.testing.assert_close(t["blk.0.ffn_gate.weight"], gate, atol=tol, rtol=0)
    assert _field(r, "general.architecture") == "llama" and int(_field(r, "llama.block_count")) == cfg.n_layer
    tok = llmkit.load_tokenizer(bpe_dir)
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert tokens[tok.token_to_id("<|endoftext|>")] == "<|endoftext|>" and len(tokens) == cfg.vocab_size
    assert len(_field(r, "tokenizer.ggml.merges")) > 100
    assert _field(r, "tokenizer.chat_template") == CHATML_TEMPLATE
    assert out.stat().st_size < {"f32": 1e9, "q8_0": 0.3, "q4_0": 0.17}[qtype] * 4 * model.num_params() + 2e5 or \
        qtype == "f32"


def test_gguf_sentencepiece_metadata_and_bad_models(spm_dir, tmp_path):
    from llmkit.compress.gguf import export_gguf

    r, _ = _reader_tensors(export_gguf(spm_dir, tmp_path / "spm.gguf", "f16"))
    tok = llmkit.load_tokenizer(spm_dir)
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert _field(r, "tokenizer.ggml.model") == "llama" and len(_field(r, "tokenizer.ggml.scores")) == len(tokens)
    assert int(_field(r, "tokenizer.ggml.bos_token_id")) == tok.bos_token_id
    assert all(" " not in s for s in tokens)  # SentencePiece spells spaces as U+2581
    with pytest.raises(ConfigError, match="type"):
        export_gguf(spm_dir, tmp_path / "x.gguf", "q2_k")
    q = llmkit.load_model(spm_dir, quantize="int8")
    q.save_pretrained(tmp_path / "q")
    with pytest.raises(ConfigError, match="quantized"):
        export_gguf(tmp_path / "q", tmp_path / "y.gguf")


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_llama_cpp_greedy_tokens_equal_llmkit(bpe_dir, tmp_path):
    import llama_cpp

    from llmkit.compress.gguf import export_gguf

    path = export_gguf(bpe_dir, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False)
    model = llmkit.load_model(bpe_dir)
    tok = llmkit.load_tokenizer(bpe_dir)
    text = "To be, or not to be"
    ids = tok.encode(text, add_special_tokens=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    ours = llmkit.generate(model, ids, 12, ignore_eos=True)
    llm.eval(ids)
    theirs = []
    for _ in range(12):
        nxt = int(np.argmax(_last_logits(llm)))
        theirs.append(nxt)
        llm.eval([nxt])
    assert theirs == ours


def _last_logits(llm) -> np.ndarray:
    """The last evaluated position's logits (llama-cpp-python keeps `scores` only with logits_all=True)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("qtype,min_cos", [("q8_0", 0.995), ("q4_0", 0.8)])
def test_llama_cpp_runs_quantized_gguf_close_to_fp32(bpe_dir, tmp_path, qtype, min_cos):
    """llama.cpp decodes our q8_0/q4_0 files: its logits stay close to llmkit's fp32 logits (and q8_0 to
    llmkit's own int8 model), so the block formats, scales and RoPE permutation are written correctly
    (measured cosines on this 0.2-std random model: q8_0 0.9990 vs fp32, 0.9995 vs int8; q4_0 0.89)."""
    import llama_cpp

    from llmkit.compress.gguf import export_gguf

    path = export_gguf(bpe_dir, tmp_path / f"m-{qtype}.gguf", qtype)
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False)
    ids = llmkit.load_tokenizer(bpe_dir).encode("To be, or not to be", add_special_tokens=False)
    llm.eval(ids)
    theirs = torch.from_numpy(_last_logits(llm))
    cos = torch.nn.functional.cosine_similarity
    with torch.inference_mode():
        fp32 = llmkit.load_model(bpe_dir)(torch.tensor([ids]))[0, -1]
        assert float(cos(theirs, fp32, dim=0)) > min_cos
        if qtype == "q8_0":
            int8 = llmkit.load_model(bpe_dir, quantize="int8")(torch.tensor([ids]))[0, -1]
            assert float(cos(theirs, int8, dim=0)) > min_cos
            assert int(theirs.argmax()) == int(fp32.argmax())


@pytest.fixture(scope="module")
def onnx_dir(bpe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "m"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", "onnx", "--model", str(bpe_dir), "--out", str(out)]) == 0
    return out


def test_onnx_runtime_greedy_tokens_equal_llmkit(bpe_dir, onnx_dir):
    import onnxruntime as ort

    from llmkit.compress.onnx import OrtModel

    model, ortm = llmkit.load_model(bpe_dir), OrtModel(onnx_dir)
    names = [i.name for i in ortm.session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.1.value" in names
    assert ortm.session.get_inputs()[3].shape[2] == "past"  # dynamic past length
    so = ortm.session.get_session_options()
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.intra_op_num_threads == torch.get_num_threads()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # different lengths: left padding + attention mask
    assert llmkit.generate(ortm, prompts, 10, ignore_eos=True) == llmkit.generate(model, prompts, 10, ignore_eos=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    torch.testing.assert_close(ortm(ids), model(ids), atol=1e-4, rtol=1e-4)


def test_generate_backend_onnxruntime_matches_torch(bpe_dir, onnx_dir, capsys):
    args = ["--prompt", "To be", "--temperature", "0", "--max-new-tokens", "8", "--ignore-eos"]
    assert main(["generate", "--model", str(onnx_dir), "--backend", "onnxruntime", *args]) == 0
    ort_text = capsys.readouterr().out
    assert main(["generate", "--model", str(bpe_dir), *args]) == 0
    assert ort_text == capsys.readouterr().out
    assert main(["generate", "--model", str(bpe_dir), "--backend", "onnxruntime", *args]) == 2
    assert "llmkit export onnx" in capsys.readouterr().err


def test_onnx_dynamic_int8_graph(bpe_dir, tmp_path):
    from llmkit.compress.onnx import OrtModel, export_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_onnx(bpe_dir, tmp_path / "q", quantize="int8")
    q, model = OrtModel(out), llmkit.load_model(bpe_dir)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    ref = model(ids)
    assert ((q(ids) - ref).norm() / ref.norm()) < 0.1
    assert (out / "model.onnx").stat().st_size < 0.5 * 4 * model.num_params()
    with pytest.raises(CheckpointError, match="export onnx"):
        OrtModel(bpe_dir)


def test_gguf_mixtral_experts(tmp_path_factory, tmp_path):
    folder = _folder(tmp_path_factory, "moe", RawTokenizer.from_str(byte_level_bpe().to_str()), "mixtral")
    from llmkit.compress.gguf import export_gguf

    r, t = _reader_tensors(export_gguf(folder, tmp_path / "moe.gguf", "f32"))
    model = llmkit.load_model(folder)
    inter, E = model.config.intermediate_size, model.config.n_expert
    assert int(_field(r, "llama.expert_count")) == E
    torch.testing.assert_close(t["blk.1.ffn_gate_exps.weight"], model.blocks[1].mlp.w_fc.detach()[:, :inter])
    torch.testing.assert_close(t["blk.1.ffn_up_exps.weight"], model.blocks[1].mlp.w_fc.detach()[:, inter:])
    torch.testing.assert_close(t["blk.0.ffn_down_exps.weight"], model.blocks[0].mlp.w_proj.detach())
    assert t["blk.0.ffn_gate_inp.weight"].shape == (E, model.config.n_embd)
