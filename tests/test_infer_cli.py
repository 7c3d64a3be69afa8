"""`llmkit generate` and `llmkit chat` end to end (subprocess, piped stdin) against transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_infer_fixtures import byte_level_bpe, hf_checkpoint
from tokenizers import Tokenizer as RawTokenizer

from llmkit.tokenizer import CHATML_TEMPLATE, Tokenizer

MAX_NEW = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama + a byte-level BPE tokenizer with ChatML specials, in one folder."""
    folder = tmp_path_factory.mktemp("chatmodel")
    raw = RawTokenizer.from_str(byte_level_bpe().to_str())
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(raw, {"eos_token": "<|endoftext|>"}, chat_template=CHATML_TEMPLATE)
    tok.save(folder)
    hf = hf_checkpoint("llama", folder, vocab_size=tok.vocab_size, max_position_embeddings=256, initializer_range=0.3)
    import transformers

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    hf_tok.chat_template = CHATML_TEMPLATE
    return folder, hf, hf_tok, tok.eos_token_ids


def _hf_complete(hf, hf_tok, ids: list[int], eos: list[int]) -> str:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    new = [t for t in out[0, len(ids) :].tolist() if t not in eos]
    return hf_tok.decode(new, skip_special_tokens=True)


def _cli(*args: str, stdin: str = "") -> str:
    res = subprocess.run(
        [sys.executable, "-m", "llmkit", *args], input=stdin, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_generate_cli_matches_transformers(model_dir):
    folder, hf, hf_tok, eos = model_dir
    prompt = "To be, or not"
    expected = _hf_complete(hf, hf_tok, hf_tok.encode(prompt), eos)
    out = _cli(
        "generate", "--model", str(folder), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(MAX_NEW)
    )
    assert out == expected + "\n"
    assert len(expected) > 3


def test_chat_cli_multi_turn_reset_and_system(model_dir):
    folder, hf, hf_tok, eos = model_dir

    def reply(messages):
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return _hf_complete(hf, hf_tok, list(ids), eos)

    r1 = reply([{"role": "user", "content": "hello"}])
    r2 = reply(
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": r1},
            {"role": "user", "content": "and then?"},
        ]
    )
    r3 = reply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    stdin = "hello\nand then?\n/reset\nhello\n/system Be brief.\nhello\n"  # EOF = Ctrl-D
    out = _cli("chat", "--model", str(folder), "--temperature", "0", "--max-new-tokens", str(MAX_NEW), stdin=stdin)
    assert out == f"{r1}\n{r2}\n{r1}\n{r3}\n"
    assert r2 != r1 or r3 != r1  # history and system prompt really change the input


def test_generate_cli_bad_input_is_a_clear_error(model_dir):
    folder = model_dir[0]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmkit",
            "generate",
            "--model",
            str(folder),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "1000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert "context length" in res.stderr and "Traceback" not in res.stderr
