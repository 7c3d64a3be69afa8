"""Shared builders for the serving tests: a tiny random-init Llama + ChatML BPE tokenizer (no tests here)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    text = DATA.read_text(encoding="utf-8")[:40_000] if DATA.exists() else "hello world, how are you? " * 400
    return [line for line in text.splitlines() if line]


def build_tokenizer(out: Path, vocab_size: int = 384) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) with ChatML special tokens, saved as a HF tokenizer folder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHATML,
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok


def build_tiny_llama(out: Path, hidden: int = 64, layers: int = 2, ctx: int = 256, seed: int = 0) -> Path:
    """A random-init `transformers` LlamaForCausalLM + tokenizer saved in `out` (a HF folder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=ctx,
        eos_token_id=tok.token_to_id("<|endoftext|>"),
        bos_token_id=None,
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a larger init than 0.02 so the distribution is not flat: greedy ties are unlikely
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return out


@contextlib.contextmanager
def running_server(model_dir: Path, **kwargs) -> Iterator:
    """A real uvicorn server on 127.0.0.1 (free port) in a background thread; yields the BackgroundServer."""
    from llmkit.serve import BackgroundServer, create_app, load_state

    state = load_state(model_dir, **kwargs)
    srv = BackgroundServer(create_app(state))
    srv.state = state
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def wait_idle(engine, timeout: float = 5.0) -> dict:
    """Poll until the engine has no running or queued sequence and every KV block is free; return stats."""
    import time

    t0 = time.monotonic()
    while True:
        s = engine.stats()
        if (s["running"], s["queued"], s["free_blocks"]) == (0, 0, s["total_blocks"]):
            return s
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"engine not idle after {timeout}s: {s}")
        time.sleep(0.02)
