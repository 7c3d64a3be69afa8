"""Named configs for training from scratch. `ModelConfig.from_preset(name, **overrides)` builds one."""

from __future__ import annotations

from typing import Any

_LLAMA = dict(model_type="llama", norm="rmsnorm", mlp="swiglu", activation="silu", pos="rope", norm_eps=1e-5)
_GPT2 = dict(
    model_type="gpt2", norm="layernorm", mlp="gelu", activation="gelu_tanh", pos="learned",
    qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True, norm_eps=1e-5,
)

PRESETS: dict[str, dict[str, Any]] = {
    # a few hundred thousand parameters: tests and smoke runs
    "tiny": dict(_LLAMA, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                 intermediate_size=176, block_size=256, tie_embeddings=True),
    # ~6M: the quickstart model (fits a few CPU minutes)
    "llama-6m": dict(_LLAMA, vocab_size=4096, n_layer=6, n_head=6, n_kv_head=2, n_embd=192,
                     intermediate_size=512, block_size=256, tie_embeddings=True),
    # ~60M (with a 32k vocabulary)
    "llama-60m": dict(_LLAMA, vocab_size=32000, n_layer=8, n_head=8, n_kv_head=8, n_embd=512,
                      intermediate_size=1376, block_size=1024),
    # GPT-2 small, 124M
    "gpt2-small": dict(_GPT2, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024),
    # a tiny sparse MoE (Mixtral layout)
    "moe-tiny": dict(_LLAMA, model_type="mixtral", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2,
                     n_embd=64, intermediate_size=128, block_size=256, n_expert=4, n_expert_per_tok=2),
}
