"""Phi-3: the Llama block with q, k, v fused in `qkv_proj` and gate, up fused in `gate_up_proj` (the
same layouts as ours, so the rules are copies), optional sliding window on every layer, LongRoPE
(short / long per-frequency factors, cos and sin scaled by sqrt(1 + ln s / ln L_orig))."""

from __future__ import annotations

from typing import Any

from llmkit.errors import ConfigError
from llmkit.model.config import ModelConfig
from llmkit.model.families import ACT_TO_HF, Family, Rules, act_from_hf, register


def config_from_hf(d: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    rp = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
    if rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("phi3 with partial_rotary_factor != 1 (Phi-4-mini) is not supported yet")
    kind = rp.get("rope_type", rp.get("type", "default"))
    scaling = None
    if kind in ("longrope", "su", "yarn"):
        scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
        scaling["rope_type"] = "longrope"
        scaling.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings", 4096))
    elif kind != "default":
        raise ConfigError(f"phi3 rope type {kind!r} is not supported; expected default or longrope")
    return ModelConfig(
        **common, n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
        n_kv_head=d.get("num_key_value_heads") or d["num_attention_heads"], n_embd=d["hidden_size"],
        intermediate_size=d["intermediate_size"], block_size=d.get("max_position_embeddings", 4096),
        norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-5), mlp="swiglu",
        activation=act_from_hf(d.get("hidden_act", "silu")), pos="rope", rope_theta=theta, rope_scaling=scaling,
        sliding_window=d.get("sliding_window"), tie_embeddings=d.get("tie_word_embeddings", False),
    )


def config_to_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    if cfg.pos != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or cfg.qkv_bias or cfg.layer_types:
        raise ConfigError("model_type 'phi3' needs pos=rope, norm=rmsnorm, mlp=swiglu, no biases, one window")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0}
    if cfg.rope_scaling:
        rope.update(cfg.rope_scaling)
    d.pop("rope_scaling", None)
    d.update(hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
             num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
             hidden_act=ACT_TO_HF[cfg.activation], max_position_embeddings=cfg.block_size,
             original_max_position_embeddings=(cfg.rope_scaling or {}).get("original_max_position_embeddings",
                                                                            cfg.block_size),
             rms_norm_eps=cfg.norm_eps, rope_parameters=rope, sliding_window=cfg.sliding_window,
             tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout)


def rules(cfg: ModelConfig, p: str, fused_experts: bool = False) -> Rules:
    R = Rules()
    R.add("wte.weight", f"{p}embed_tokens.weight")
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"{p}layers.{i}."
        R.add(b + "ln_1.weight", h + "input_layernorm.weight")
        R.add(b + "ln_2.weight", h + "post_attention_layernorm.weight")
        R.add(b + "attn.qkv.weight", h + "self_attn.qkv_proj.weight")
        R.add(b + "attn.proj.weight", h + "self_attn.o_proj.weight")
        R.add(b + "mlp.fc.weight", h + "mlp.gate_up_proj.weight")
        R.add(b + "mlp.proj.weight", h + "mlp.down_proj.weight")
    R.add("ln_f.weight", f"{p}norm.weight")
    if not cfg.tie_embeddings:
        R.add("lm_head.weight", "lm_head.weight")
    return R


register(Family("phi3", "Phi3ForCausalLM", config_from_hf, config_to_hf, rules, anchor="embed_tokens.weight",
                load_prefixes=("model.", ""), save_prefix="model."))
