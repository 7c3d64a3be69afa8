"""Position encodings against independent references, and clear errors for bad checkpoints and inputs."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers as T

import llmkit
from llmkit.errors import CheckpointError, ConfigError, InputError
from llmkit.model.positions import alibi_slopes, sinusoidal_table


@pytest.mark.parametrize("n_head", [4, 8, 12, 6])
def test_alibi_slopes_match_bloom(n_head):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 3), n_head, torch.float32)  # [H, 1, 3] = slope * position
    assert torch.allclose(alibi_slopes(n_head), alibi[:, 0, 1], atol=1e-7)


def test_alibi_attention_matches_hand_computation():
    cfg = llmkit.ModelConfig(vocab_size=50, n_layer=1, n_head=4, n_embd=32, pos="alibi", norm="layernorm",
                             mlp="gelu", activation="gelu", block_size=32)
    model = llmkit.Transformer(cfg).eval()
    ids = torch.randint(0, 50, (1, 7))
    blk = model.blocks[0]
    x = model.wte(ids)
    h = blk.ln_1(x)
    q, k, v = blk.attn.qkv(h).split(32, -1)
    q, k, v = (t.view(1, 7, 4, 8).transpose(1, 2) for t in (q, k, v))
    slopes = [2 ** (-8 * (i + 1) / 4) for i in range(4)]  # the paper's formula for 4 heads
    bias = torch.tensor([[[-s * (i - j) if j <= i else -math.inf for j in range(7)] for i in range(7)]
                         for s in slopes])
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, -1) @ v
    x = x + blk.attn.proj(att.transpose(1, 2).reshape(1, 7, 32))
    x = x + blk.mlp(blk.ln_2(x))
    expected = model.lm_head(model.ln_f(x))
    with torch.no_grad():
        assert (model(ids) - expected).abs().max() < 1e-5


def test_sinusoidal_positions_match_the_paper():
    pe = sinusoidal_table(20, 16)
    for pos in (0, 3, 19):
        for i in range(8):
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-5)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-5)
    cfg = llmkit.ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, pos="sinusoidal", block_size=20)
    model = llmkit.Transformer(cfg).eval()
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    ids = torch.randint(0, 50, (2, 9))
    model(ids)
    assert torch.allclose(seen["x"], model.wte(ids) + pe[:9], atol=1e-6)
    with pytest.raises(InputError, match="context length"):
        model(torch.zeros(1, 21, dtype=torch.long))


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA with 2 KV heads equals MHA whose K/V weights repeat each KV head for its query group."""
    gqa = llmkit.Transformer(llmkit.ModelConfig(vocab_size=40, n_layer=1, n_head=4, n_kv_head=2, n_embd=32)).eval()
    mha = llmkit.Transformer(llmkit.ModelConfig(vocab_size=40, n_layer=1, n_head=4, n_kv_head=4, n_embd=32)).eval()
    sd = gqa.state_dict()
    q, k, v = sd["blocks.0.attn.qkv.weight"].split([32, 16, 16])
    rep = lambda w: w.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)  # noqa: E731
    sd["blocks.0.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    ids = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        assert (gqa(ids) - mha(ids)).abs().max() < 1e-5


def _llama_folder(tmp_path):
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=64)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        llmkit.load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        llmkit.load_model(tmp_path / "nowhere")


def test_truncated_safetensors(tmp_path):
    path = _llama_folder(tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        llmkit.load_model(path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = _llama_folder(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj.*shape \(96, 32\).*expects \(128, 32\)"):
        llmkit.load_model(path)


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _llama_folder(tmp_path)
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.0.self_attn.k_proj.weight"]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing 1 tensor.*k_proj"):
        llmkit.load_model(path)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 32)
    sd["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="does not use.*extra.weight"):
        llmkit.load_model(path)


def test_unknown_model_type_and_config_keys(tmp_path):
    path = _llama_folder(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "whisper"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'whisper'"):
        llmkit.load_model(path)
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))  # a llama config.json
    with pytest.raises(ConfigError, match="model_type 't5' lacks the key 'num_layers'"):
        llmkit.load_model(path)
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        llmkit.ModelConfig.from_dict({"n_layers": 3})
    with pytest.raises(ConfigError, match="unknown preset"):
        llmkit.ModelConfig.from_preset("gpt5")


def test_token_ids_out_of_range(tmp_path):
    model = llmkit.load_model(_llama_folder(tmp_path))
    with pytest.raises(InputError, match=r"token ids must be in \[0, 64\), got min 0, max 64"):
        model(torch.tensor([[0, 64]]))
    with pytest.raises(InputError, match="must be 2-D"):
        model(torch.tensor([1, 2]))


def test_cli_reports_errors_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, "-m", "llmkit", "info", str(tmp_path / "empty")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    assert "no config.json" in r.stderr and "Traceback" not in r.stderr


def test_padding_rows_never_produce_nan(tmp_path):
    model = llmkit.load_model(_llama_folder(tmp_path))
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
    assert torch.isfinite(logits).all()
    assert torch.allclose(F.softmax(logits, -1).sum(-1), torch.ones(2, 6), atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_llmkit_family_round_trip(tmp_path, tied):
    """Architectures no HF family has (here ALiBi) save as model_type 'llmkit' and load back exactly."""
    cfg = llmkit.ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_embd=32, pos="alibi", tie_embeddings=tied)
    model = llmkit.Transformer(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llmkit"
    back = llmkit.load_model(tmp_path / "m")
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))
    assert (back.lm_head.weight is back.wte.weight) == tied


def test_layernorm_without_bias(tmp_path):
    """norm_bias=False (nanoGPT's bias=False) drops LayerNorm's bias and round-trips as model_type 'llmkit'."""
    kw = dict(vocab_size=30, n_layer=1, n_head=2, n_embd=16, norm="layernorm", mlp="gelu", activation="gelu",
              pos="learned", block_size=16)
    model = llmkit.Transformer(llmkit.ModelConfig(**kw, norm_bias=False)).eval()
    assert model.ln_f.bias is None
    x = torch.randn(2, 16)
    assert torch.allclose(model.ln_f(x), F.layer_norm(x, (16,)) * model.ln_f.weight, atol=1e-6)
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 30, (1, 7))
    with torch.no_grad():
        assert torch.equal(llmkit.load_model(tmp_path / "m")(ids), model(ids))
    with pytest.raises(ConfigError, match="LayerNorm biases"):
        llmkit.Transformer(llmkit.ModelConfig(**{**kw, "model_type": "gpt2"}, norm_bias=False)).save_pretrained(
            tmp_path / "g")
