"""Gemma 2 and Gemma 3 (text): Llama names plus sandwich norms (pre and post attention / MLP), RMSNorm
stored as w - 1, embeddings scaled by sqrt(d), GeGLU (`gelu_pytorch_tanh`), alternating sliding-window
layers, query_pre_attn_scalar; Gemma 2 soft-caps attention scores and logits, Gemma 3 norms q and k
and gives its sliding layers their own RoPE base (`rope_local_base_freq`)."""

from __future__ import annotations

from typing import Any

from llmkit.errors import ConfigError
from llmkit.model.config import ModelConfig
from llmkit.model.families import Family, Rules, act_from_hf, register
from llmkit.model.families.llama import attention_rules


def _rope(d: dict[str, Any]) -> tuple[float, dict | None, float | None]:
    """(global theta, global scaling, local theta) from old (`rope_theta`, `rope_scaling`,
    `rope_local_base_freq`) or transformers 5 (`rope_parameters`, per layer type for Gemma 3) keys."""
    rp = d.get("rope_parameters") or {}
    full = rp.get("full_attention", rp) if isinstance(rp.get("full_attention"), dict) else rp
    local = rp.get("sliding_attention") if isinstance(rp.get("sliding_attention"), dict) else {}
    theta = d.get("rope_theta", full.get("rope_theta", 10000.0 if d["model_type"] == "gemma2" else 1e6))
    scaling = d.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    local_theta = None
    if d["model_type"] == "gemma3_text":
        local_theta = d.get("rope_local_base_freq", local.get("rope_theta", 10000.0))
    return theta, scaling, local_theta


def config_from_hf(d: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    mt = d["model_type"]
    if d.get("use_bidirectional_attention"):
        raise ConfigError(f"{mt} with use_bidirectional_attention is an encoder; llmkit loads the causal model")
    n_layer = d["num_hidden_layers"]
    pattern = 2 if mt == "gemma2" else d.get("sliding_window_pattern", 6)
    layer_types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                           for i in range(n_layer)]
    theta, scaling, local_theta = _rope(d)
    head_dim = d.get("head_dim", 256)
    return ModelConfig(
        **common, n_layer=n_layer, n_head=d["num_attention_heads"],
        n_kv_head=d.get("num_key_value_heads") or d["num_attention_heads"], n_embd=d["hidden_size"],
        head_dim=head_dim, intermediate_size=d["intermediate_size"],
        block_size=d.get("max_position_embeddings", 8192), norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6),
        norm_offset=1.0, post_norms=True, scale_embeddings=True, mlp="swiglu",
        activation=act_from_hf(d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"),
        pos="rope", rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
        sliding_window=d.get("sliding_window", 4096), layer_types=layer_types,
        qkv_bias=d.get("attention_bias", False), attn_out_bias=d.get("attention_bias", False),
        attn_scale=d.get("query_pre_attn_scalar", 256) ** -0.5,
        attn_softcap=d.get("attn_logit_softcapping", 50.0 if mt == "gemma2" else None),
        final_softcap=d.get("final_logit_softcapping", 30.0 if mt == "gemma2" else None),
        qk_norm=mt == "gemma3_text", tie_embeddings=d.get("tie_word_embeddings", True),
    )


def config_to_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    mt = cfg.model_type
    if not (cfg.norm_offset == 1.0 and cfg.post_norms and cfg.scale_embeddings and cfg.mlp == "swiglu"):
        raise ConfigError(f"model_type {mt!r} needs Gemma's norms, scaled embeddings and a gated MLP")
    scalar = round(cfg.attn_scale**-2) if cfg.attn_scale is not None else cfg.head_dim
    d.update(hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
             num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
             hidden_activation="gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else cfg.activation,
             max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, sliding_window=cfg.sliding_window,
             layer_types=cfg.layer_types, query_pre_attn_scalar=scalar, attention_bias=cfg.qkv_bias,
             attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
             tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout, rope_scaling=None)
    full = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    if mt == "gemma2":
        d.update(rope_theta=cfg.rope_theta, rope_parameters=full)
    else:
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        d.update(rope_parameters={"full_attention": full, "sliding_attention": local})
        d.pop("rope_theta", None)
        d.pop("rope_local_base_freq", None)


def rules(cfg: ModelConfig, p: str, fused_experts: bool = False) -> Rules:
    R = Rules()
    inter = cfg.intermediate_size
    R.add("wte.weight", f"{p}embed_tokens.weight")
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"{p}layers.{i}."
        for ours, theirs in (("ln_1", "input_layernorm"), ("ln_attn_post", "post_attention_layernorm"),
                             ("ln_2", "pre_feedforward_layernorm"), ("ln_mlp_post", "post_feedforward_layernorm")):
            R.add(b + ours + ".weight", h + theirs + ".weight")
        attention_rules(R, cfg, b, h)
        R.add(b + "mlp.fc.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"], "cat", [inter, inter])
        R.add(b + "mlp.proj.weight", h + "mlp.down_proj.weight")
    R.add("ln_f.weight", f"{p}norm.weight")
    if not cfg.tie_embeddings:
        R.add("lm_head.weight", "lm_head.weight")
    return R


for _mt, _arch in (("gemma2", "Gemma2ForCausalLM"), ("gemma3_text", "Gemma3ForCausalLM")):
    register(Family(_mt, _arch, config_from_hf, config_to_hf, rules, anchor="embed_tokens.weight",
                    load_prefixes=("model.", ""), save_prefix="model."))
