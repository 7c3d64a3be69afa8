"""BERT encoders (`BertModel`): post-LN blocks, learned positions, token types, pooler."""

from __future__ import annotations

from typing import Any

from llmkit.errors import ConfigError
from llmkit.model.config import ModelConfig
from llmkit.model.families import ACT_TO_HF, Family, Rules, act_from_hf, register


def config_from_hf(d: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        **common, n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"], n_embd=d["hidden_size"],
        intermediate_size=d["intermediate_size"], block_size=d.get("max_position_embeddings", 512),
        norm="layernorm", norm_eps=d.get("layer_norm_eps", 1e-12), mlp="gelu",
        activation=act_from_hf(d.get("hidden_act", "gelu")), pos="learned", qkv_bias=True,
        type_vocab_size=d.get("type_vocab_size", 2),
    )


def config_to_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    if not cfg.norm_bias:
        raise ConfigError("model_type 'bert' has LayerNorm biases; use model_type 'llmkit' for norm_bias=False")
    d.update(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
             intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.block_size,
             layer_norm_eps=cfg.norm_eps, hidden_act=ACT_TO_HF[cfg.activation],
             type_vocab_size=cfg.type_vocab_size, hidden_dropout_prob=cfg.dropout,
             attention_probs_dropout_prob=cfg.dropout)


def rules(cfg: ModelConfig, p: str, fused_experts: bool = False) -> Rules:
    R = Rules()
    e = f"{p}embeddings."
    R.add("wte.weight", e + "word_embeddings.weight")
    R.add("wpe.weight", e + "position_embeddings.weight")
    R.add("wtt.weight", e + "token_type_embeddings.weight")
    R.add("ln_emb.weight", e + "LayerNorm.weight")
    R.add("ln_emb.bias", e + "LayerNorm.bias")
    for i in range(cfg.n_layer):
        b, h = f"layers.{i}.", f"{p}encoder.layer.{i}."
        qkv = [h + f"attention.self.{n}" for n in ("query", "key", "value")]
        for t in ("weight", "bias"):
            R.add(b + "qkv." + t, [n + "." + t for n in qkv], "cat", [cfg.n_embd] * 3)
            R.add(b + "attn_out." + t, h + "attention.output.dense." + t)
            R.add(b + "ln_attn." + t, h + "attention.output.LayerNorm." + t)
            R.add(b + "fc." + t, h + "intermediate.dense." + t)
            R.add(b + "proj." + t, h + "output.dense." + t)
            R.add(b + "ln_mlp." + t, h + "output.LayerNorm." + t)
    for t in ("weight", "bias"):
        R.add("pooler." + t, f"{p}pooler.dense." + t)
    return R


register(Family("bert", "BertModel", config_from_hf, config_to_hf, rules,
                anchor="embeddings.word_embeddings.weight", load_prefixes=("", "bert."), save_prefix="",
                encoder=True, ignorable_roots=("cls", "lm_head", "classifier")))
