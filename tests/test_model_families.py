"""Qwen3, Gemma 2, Gemma 3 and Phi-3 against random-initialised `transformers` references: logits
(batched, left-padded), save -> transformers load, greedy `generate` and the engine == HF `generate`."""

import pytest
import torch
import transformers as T

import llmkit
from llmkit.infer.engine import Engine
from llmkit.infer.sampling import SamplingParams

V = 96
_DEC = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=V, max_position_embeddings=64, initializer_range=0.1, bos_token_id=0, eos_token_id=None,
            pad_token_id=0)
_LONGROPE = dict(rope_type="longrope", short_factor=[1.0 + 0.1 * i for i in range(4)],
                 long_factor=[1.5 + 0.5 * i for i in range(4)], original_max_position_embeddings=16, rope_theta=1e4)
FAMILIES = {
    "qwen3": (T.Qwen3Config, dict(_DEC, head_dim=16)),
    "qwen3-sliding": (T.Qwen3Config, dict(_DEC, head_dim=12, use_sliding_window=True, sliding_window=4,
                                          max_window_layers=1)),
    "gemma2": (T.Gemma2Config, dict(_DEC, head_dim=16, sliding_window=4, query_pre_attn_scalar=12,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3_text": (T.Gemma3TextConfig, dict(_DEC, num_hidden_layers=3, head_dim=8, sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                             query_pre_attn_scalar=8,
                                             rope_parameters={"full_attention": {"rope_type": "default",
                                                                                 "rope_theta": 1e6},
                                                              "sliding_attention": {"rope_type": "default",
                                                                                    "rope_theta": 1e3}})),
    "phi3": (T.Phi3Config, dict(_DEC, original_max_position_embeddings=16, rope_parameters=_LONGROPE)),
    "phi3-sliding": (T.Phi3Config, dict(_DEC, sliding_window=5)),
}


def make_reference(name, tmp_path):
    C, kw = FAMILIES[name]
    torch.manual_seed(0)
    ref = T.AutoModelForCausalLM.from_config(C(**kw), attn_implementation="eager").eval()
    ref.generation_config.eos_token_id = None
    path = tmp_path / name
    ref.save_pretrained(path)
    return ref, path


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    ref, path = make_reference(request.param, tmp_path_factory.mktemp("fam"))
    return request.param, ref, llmkit.load_model(path), path


def test_logits_match_batched_and_left_padded(pair):
    """A left-padded batch gives each row the logits transformers gives that row alone (Phi-3: rows of
    20 / 16 / 11 real tokens, so one row uses LongRoPE's long factors and two the short ones)."""
    _, ref, model, _ = pair
    ids = torch.randint(1, V, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert (ref(ids[:1]).logits - model(ids[:1])).abs().max().item() <= 1e-4
        b = model(ids, attention_mask=mask, position_ids=pos)
        assert torch.isfinite(b).all()
        for i in range(3):
            real = mask[i].bool()
            a = ref(ids[i : i + 1, real]).logits[0]
            assert (a - b[i, real]).abs().max().item() <= 1e-4


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    _, _, model, _ = pair
    model.save_pretrained(tmp_path / "out")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = torch.randint(0, V, (2, 18))
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() <= 1e-4

    def arch(cfg):
        return {k: v for k, v in cfg.to_dict().items() if k != "extra"}

    assert arch(llmkit.load_model(tmp_path / "out").config) == arch(model.config)


# Phi-3 (16 original positions): every row stays within them or starts past them. transformers drops
# its cache and recomputes the sequence with the long factors when a row crosses; llmkit keeps the
# cache (docs/models.md), so a crossing row may differ after the crossing.
PROMPTS = [[5, 17, 3, 88, 41], [9] * 11, list(range(10, 31)), [60]]
N_NEW = [12, 5, 6, 14]


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_generate_and_engine_greedy_match_transformers(pair):
    _, ref, model, _ = pair
    want = [_hf_greedy(ref, p, n) for p, n in zip(PROMPTS, N_NEW)]
    got = llmkit.generate(model, PROMPTS, max_new_tokens=max(N_NEW))  # one left-padded batch
    assert [g[:n] for g, n in zip(got, N_NEW)] == want
    with Engine(model, max_batch_size=1, kv_block_size=4) as alone:
        got_alone = [alone.submit(p, SamplingParams(max_new_tokens=n, temperature=0.0)).result().token_ids
                     for p, n in zip(PROMPTS, N_NEW)]
    with Engine(model, max_batch_size=3, kv_block_size=4) as batched:
        hs = [batched.submit(p, SamplingParams(max_new_tokens=n, temperature=0.0)) for p, n in zip(PROMPTS, N_NEW)]
        got_batched = [h.result().token_ids for h in hs]
    assert got_alone == want
    assert got_batched == want


def test_gemma_tokenizer_ids_match_transformers(tmp_path):
    """GemmaTokenizer (byte-fallback BPE): transformers rebuilds the pipeline from the class, ignoring
    the file's normalizer / pre-tokenizer; llmkit's tokenizer does the same (same ids, same text)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from llmkit.tokenizer import load_tokenizer

    text = open("../shared/data/tinyshakespeare/input.txt").read()[:40000].split("\n")
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    tk.normalizer = normalizers.NFKC()  # what the class rebuild must ignore
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    T.GemmaTokenizerFast(tokenizer_object=tk).save_pretrained(tmp_path)
    hf = T.AutoTokenizer.from_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    for s in ["Hello world, my lord!", "  two  spaces\nand a newline", "What, ho! Romeo."]:
        ids = hf(s)["input_ids"]
        assert tok.encode(s) == ids
        assert tok.decode(ids) == hf.decode(ids)
