"""GPT-2: LayerNorm, learned positions, GELU MLP, Conv1D weights stored transposed (`transformer.h.{i}`)."""

from __future__ import annotations

from typing import Any

from llmkit.errors import ConfigError
from llmkit.model.config import ModelConfig
from llmkit.model.families import ACT_TO_HF, Family, Rules, act_from_hf, register


def config_from_hf(d: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        **common, n_layer=d["n_layer"], n_head=d["n_head"], n_embd=d["n_embd"],
        intermediate_size=d.get("n_inner"), block_size=d.get("n_positions", 1024), norm="layernorm",
        norm_eps=d.get("layer_norm_epsilon", 1e-5), mlp="gelu",
        activation=act_from_hf(d.get("activation_function", "gelu_new")), pos="learned",
        qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=d.get("tie_word_embeddings", True),
    )


def config_to_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    if not cfg.norm_bias:
        raise ConfigError("model_type 'gpt2' has LayerNorm biases; use model_type 'llmkit' for norm_bias=False")
    d.update(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_positions=cfg.block_size,
             n_inner=cfg.intermediate_size, activation_function=ACT_TO_HF[cfg.activation],
             layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
             resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)


def rules(cfg: ModelConfig, p: str, fused_experts: bool = False) -> Rules:
    R = Rules()
    R.add("wte.weight", f"{p}wte.weight")
    R.add("wpe.weight", f"{p}wpe.weight")
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"{p}h.{i}."
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
            R.add(b + ours + ".weight", h + theirs + ".weight")
            R.add(b + ours + ".bias", h + theirs + ".bias")
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            R.add(b + ours + ".weight", h + theirs + ".weight", "t")
            R.add(b + ours + ".bias", h + theirs + ".bias")
    R.add("ln_f.weight", f"{p}ln_f.weight")
    R.add("ln_f.bias", f"{p}ln_f.bias")
    if not cfg.tie_embeddings:
        R.add("lm_head.weight", "lm_head.weight")
    return R


register(Family("gpt2", "GPT2LMHeadModel", config_from_hf, config_to_hf, rules, anchor="wte.weight",
                load_prefixes=("transformer.", ""), save_prefix="transformer."))
