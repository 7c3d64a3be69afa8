"""Shared builders for the inference tests: tiny tokenizers and checkpoints (no tests in here)."""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
EXTRA = "你好，世界！今天天气很好。🙂🚀 naïve café – ok. 日本語のテキスト。"


def _corpus() -> list[str]:
    text = DATA.read_text(encoding="utf-8")[:60_000] if DATA.exists() else "hello world " * 500
    return [line for line in text.splitlines() if line] + [EXTRA] * 3


@functools.lru_cache
def byte_level_bpe() -> Tokenizer:
    """GPT-2/Qwen-style byte-level BPE with 512 tokens (Chinese/emoji split into several tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


@functools.lru_cache
def sentencepiece_bpe() -> Tokenizer:
    """Llama-2-style tokenizer: '▁' prefix space, byte fallback for unseen characters."""
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    base.train_from_iterator([t for t in _corpus() if t != EXTRA], trainer)  # CJK/emoji -> byte fallback
    vocab = base.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(base)]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = base.normalizer
    tok.pre_tokenizer = base.pre_tokenizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


def _merges(tok: Tokenizer) -> list:
    import json

    return json.loads(tok.to_str())["model"]["merges"]


def hf_config(family: str, **over):
    """A tiny random-init transformers config of `family` (llama, qwen2, mistral, mixtral, gpt2)."""
    import transformers

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    common.update(over)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "mistral":  # window (6) smaller than prompt + output
        return transformers.MistralConfig(**{"sliding_window": 6, **common})
    if family == "gpt2":  # learned positions + LayerNorm + GELU: the model's own forward, not the fast path
        common.pop("intermediate_size"), common.pop("num_key_value_heads")
        return transformers.GPT2Config(**common)
    if family == "mixtral":
        return transformers.MixtralConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2, **common})
    raise ValueError(family)


def hf_checkpoint(family: str, folder: Path, seed: int = 0, **over):
    """Random-init a transformers model, save it to `folder`; return the transformers model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **over)).eval()
    model.save_pretrained(folder)
    return model
