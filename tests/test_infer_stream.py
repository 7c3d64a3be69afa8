"""stream_text / generate_text: UTF-8-safe deltas (Chinese, emoji) and stop strings, end to end."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_infer_fixtures import byte_level_bpe, sentencepiece_bpe

from llmkit.infer.generate import generate, generate_text, stream_text


class ScriptedLM(torch.nn.Module):
    """A model that always predicts the next token of a fixed script (then EOS), via the KV-cache hook."""

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int, eos: int):
        super().__init__()
        self.config = SimpleNamespace(
            vocab_size=vocab_size, block_size=512, n_layer=1, n_kv_head=1, head_dim=2, eos_token_ids=[eos]
        )
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.script, self.prompt_len, self.eos = script + [eos], prompt_len, eos

    def forward(self, input_ids, position_ids=None, kv_cache=None, num_logits_to_keep=0, **_):
        B, T = input_ids.shape
        if kv_cache is not None:
            kv_cache.update(0, torch.zeros(B, 1, T, 2), torch.zeros(B, 1, T, 2))
        nxt = int(position_ids[0, -1]) + 1 - self.prompt_len
        logits = torch.zeros(B, 1, self.config.vocab_size)
        logits[:, :, self.script[min(nxt, len(self.script) - 1)]] = 10.0
        return logits


TEXT = "你好，世界！🙂 streaming 🚀 works. 日本語"


@pytest.mark.parametrize("make", [byte_level_bpe, sentencepiece_bpe], ids=["bytelevel", "sentencepiece"])
def test_stream_text_utf8_safe(make):
    tok = make()
    prompt = "Say:"
    p_ids = tok.encode(prompt).ids
    script = tok.encode(prompt + " " + TEXT).ids[len(p_ids) :]
    eos = tok.token_to_id("</s>") or tok.token_to_id("<|endoftext|>")
    model = ScriptedLM(script, len(p_ids), tok.get_vocab_size(), eos)
    deltas = list(stream_text(model, tok, p_ids, max_new_tokens=200, temperature=0))
    assert "".join(deltas) == " " + TEXT
    assert len(deltas) > 10 and all(d and "\ufffd" not in d for d in deltas)
    # the ids-level API sees the same tokens, then the EOS that ended the row (like transformers)
    assert generate(model, p_ids, 200) == script + [eos]
    assert generate_text(model, tok, p_ids, max_new_tokens=200, temperature=0) == " " + TEXT


def test_stream_text_stop_strings_and_length():
    tok = byte_level_bpe()
    p_ids = tok.encode("Q:").ids
    script = tok.encode("Q: first line\n\nsecond 🙂 line").ids[len(p_ids) :]
    model = ScriptedLM(script, len(p_ids), tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"))
    assert generate_text(model, tok, p_ids, max_new_tokens=100, stop=["\n\n"]) == " first line"
    assert generate_text(model, tok, p_ids, max_new_tokens=100, stop=["🙂"]) == " first line\n\nsecond "
    assert generate_text(model, tok, p_ids, max_new_tokens=100, stop=["nothing"]) == " first line\n\nsecond 🙂 line"
    n = 3
    assert generate_text(model, tok, p_ids, max_new_tokens=n) == tok.decode(script[:n])
