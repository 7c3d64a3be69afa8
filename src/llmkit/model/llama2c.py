"""Import llama2.c checkpoints (Karpathy's legacy `.bin` format) as llmkit Llama models."""

from __future__ import annotations

import os
import struct

import numpy as np
import torch

from llmkit.errors import CheckpointError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved-pair RoPE (Meta) to the rotate-half layout (HF)."""
    out, d_in = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def read_llama2c(path: str | os.PathLike) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) and raw float32 arrays."""
    raw = open(path, "rb").read()
    if len(raw) < 28:
        raise CheckpointError(f"{path} is too small to be a llama2.c checkpoint")
    dim, hidden, L, H, KV, vocab, seq = struct.unpack("7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    hs = dim // H
    shapes = [("tok_embeddings", (vocab, dim)), ("attention_norm", (L, dim)), ("wq", (L, H * hs, dim)),
              ("wk", (L, KV * hs, dim)), ("wv", (L, KV * hs, dim)), ("wo", (L, dim, H * hs)),
              ("ffn_norm", (L, dim)), ("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)),
              ("norm", (dim,)), ("freq_cis_real", (seq, hs // 2)), ("freq_cis_imag", (seq, hs // 2))]
    if not shared:
        shapes.append(("output", (vocab, dim)))
    need = 28 + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) != need:
        raise CheckpointError(f"{path}: header says {need} bytes (dim={dim}, layers={L}, vocab={vocab}), "
                              f"file has {len(raw)}; not a llama2.c legacy checkpoint or truncated")
    data = np.frombuffer(raw, dtype=np.float32, offset=28)
    arrays, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = data[off : off + n].reshape(shape)
        off += n
    header = dict(dim=dim, hidden_dim=hidden, n_layers=L, n_heads=H, n_kv_heads=KV, vocab_size=vocab, seq_len=seq,
                  shared_classifier=int(shared))
    return header, arrays


def load_llama2c(path: str | os.PathLike) -> Transformer:
    """A llama2.c `.bin` as an llmkit Llama (model_type 'llama', so it saves to a transformers folder)."""
    h, a = read_llama2c(path)
    cfg = ModelConfig(model_type="llama", vocab_size=h["vocab_size"], n_layer=h["n_layers"], n_head=h["n_heads"],
                      n_kv_head=h["n_kv_heads"], n_embd=h["dim"], intermediate_size=h["hidden_dim"],
                      block_size=h["seq_len"], norm_eps=1e-5, tie_embeddings=bool(h["shared_classifier"]),
                      bos_token_id=1, eos_token_id=2)
    model = Transformer(cfg)
    t = lambda x: torch.from_numpy(np.array(x))  # noqa: E731
    sd = {"wte.weight": t(a["tok_embeddings"]), "ln_f.weight": t(a["norm"])}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        q = unpermute_rope(t(a["wq"][i]), cfg.n_head)
        k = unpermute_rope(t(a["wk"][i]), cfg.n_kv_head)
        sd[b + "attn.qkv.weight"] = torch.cat([q, k, t(a["wv"][i])])
        sd[b + "attn.proj.weight"] = t(a["wo"][i])
        sd[b + "ln_1.weight"] = t(a["attention_norm"][i])
        sd[b + "ln_2.weight"] = t(a["ffn_norm"][i])
        sd[b + "mlp.fc.weight"] = torch.cat([t(a["w1"][i]), t(a["w3"][i])])
        sd[b + "mlp.proj.weight"] = t(a["w2"][i])
    sd["lm_head.weight"] = sd["wte.weight"] if cfg.tie_embeddings else t(a["output"])
    model.load_state_dict(sd)
    return model.eval()
