"""The real pretrained stories260K (llama2.c format) against a literal NumPy port of llama2.c's forward."""

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T

import llmkit
from llmkit.errors import CheckpointError
from llmkit.model.llama2c import load_llama2c, read_llama2c

CKPT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "stories260K" / "stories260K.bin"
pytestmark = pytest.mark.skipif(not CKPT.exists(), reason="../shared/data/stories260K not present")


def llama2c_forward(h, a, tokens):
    """run.c's forward pass, token by token, with its interleaved-pair RoPE and a KV cache."""
    dim, L, H, KV = h["dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"]
    hs = dim // H
    rms = lambda x, w: w * (x / np.sqrt(np.mean(x * x) + 1e-5))  # noqa: E731
    kc = np.zeros((L, len(tokens), KV * hs))
    vc = np.zeros_like(kc)
    out = []
    for pos, tok in enumerate(tokens):
        x = a["tok_embeddings"][tok].astype(np.float64)
        for l in range(L):
            xb = rms(x, a["attention_norm"][l])
            q, k, v = a["wq"][l] @ xb, a["wk"][l] @ xb, a["wv"][l] @ xb
            for i in range(0, dim, 2):  # rotate adjacent pairs
                freq = 1.0 / 10000.0 ** ((i % hs) / hs)
                c, s = np.cos(pos * freq), np.sin(pos * freq)
                for vec in (q, k) if i < KV * hs else (q,):
                    vec[i], vec[i + 1] = vec[i] * c - vec[i + 1] * s, vec[i] * s + vec[i + 1] * c
            kc[l, pos], vc[l, pos] = k, v
            att_out = np.zeros(dim)
            for head in range(H):
                kvh = head // (H // KV)
                qh = q[head * hs : (head + 1) * hs]
                scores = kc[l, : pos + 1, kvh * hs : (kvh + 1) * hs] @ qh / np.sqrt(hs)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                att_out[head * hs : (head + 1) * hs] = p @ vc[l, : pos + 1, kvh * hs : (kvh + 1) * hs]
            x = x + a["wo"][l] @ att_out
            xb = rms(x, a["ffn_norm"][l])
            g, u = a["w1"][l] @ xb, a["w3"][l] @ xb
            x = x + a["w2"][l] @ (g / (1 + np.exp(-g)) * u)
        out.append(a["tok_embeddings"] @ rms(x, a["norm"]))
    return np.stack(out)


def test_stories260k_matches_llama2c_and_transformers(tmp_path):
    h, a = read_llama2c(CKPT)
    assert (h["dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"], h["vocab_size"]) == (64, 5, 8, 4, 512)
    model = load_llama2c(CKPT)
    tokens = [1, 403, 407, 261, 378, 430, 261, 635 % 512, 290, 23]
    expected = llama2c_forward(h, a, tokens)
    with torch.no_grad():
        got = model(torch.tensor([tokens]))[0].double().numpy()
    assert np.abs(got - expected).max() < 1e-4
    # a real model is confident: most of its greedy predictions carry real probability mass
    assert torch.softmax(torch.from_numpy(got), -1).max(-1).values.mean() > 0.2

    from llmkit.cli import main

    assert main(["convert", "llama2c", str(CKPT), str(tmp_path / "stories")]) == 0
    ref = T.AutoModelForCausalLM.from_pretrained(tmp_path / "stories").eval()
    reloaded = llmkit.load_model(tmp_path / "stories")
    with torch.no_grad():
        assert np.abs(ref(torch.tensor([tokens])).logits[0].double().numpy() - expected).max() < 1e-4
        assert np.abs(reloaded(torch.tensor([tokens]))[0].double().numpy() - expected).max() < 1e-4


def test_truncated_llama2c_file(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(CKPT.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_llama2c(bad)
