"""Llama and its close relatives: Qwen2 (qkv bias, optional sliding layers), Qwen3 (q/k RMSNorm, no
qkv bias), Mistral (sliding window), Mixtral (sparse MoE). RMSNorm, RoPE, SwiGLU; names
`model.layers.{i}.self_attn.{q,k,v,o}_proj`."""

from __future__ import annotations

from typing import Any

from llmkit.errors import ConfigError
from llmkit.model.config import ModelConfig
from llmkit.model.families import ACT_TO_HF, Family, Rules, act_from_hf, register


def config_from_hf(d: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    mt = d["model_type"]
    rp = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    bias = d.get("attention_bias", False)
    window = d.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        window = None
    layer_types = d.get("layer_types") if window is not None else None
    return ModelConfig(
        **common, n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
        n_kv_head=d.get("num_key_value_heads") or d["num_attention_heads"], n_embd=d["hidden_size"],
        head_dim=d.get("head_dim"), intermediate_size=d["intermediate_size"],
        block_size=d.get("max_position_embeddings", 2048), norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6),
        mlp="swiglu", activation=act_from_hf(d.get("hidden_act", "silu")), pos="rope",
        rope_theta=d.get("rope_theta", rp.get("rope_theta", 10000.0)), rope_scaling=scaling,
        sliding_window=window, layer_types=layer_types, qkv_bias=bias or mt == "qwen2",
        attn_out_bias=bias, mlp_bias=d.get("mlp_bias", False),
        tie_embeddings=d.get("tie_word_embeddings", False),
        n_expert=d.get("num_local_experts", 0) if mt == "mixtral" else 0,
        n_expert_per_tok=d.get("num_experts_per_tok", 2),
        router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001), qk_norm=mt == "qwen3",
    )


def config_to_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    mt = cfg.model_type
    if cfg.pos != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu":
        raise ConfigError(f"model_type {mt!r} needs pos=rope, norm=rmsnorm, mlp=swiglu; use model_type 'llmkit'")
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    d.update(hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
             num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
             hidden_act=ACT_TO_HF[cfg.activation], max_position_embeddings=cfg.block_size,
             rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
             rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout)
    if mt in ("llama", "qwen3"):
        d.update(attention_bias=cfg.attn_out_bias)
    if mt == "llama":
        d.update(mlp_bias=cfg.mlp_bias)
    if mt in ("mistral", "mixtral"):
        d.update(sliding_window=cfg.sliding_window)
    if mt in ("qwen2", "qwen3"):
        d.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
        if cfg.layer_types is not None:
            d.update(layer_types=cfg.layer_types)
    if mt == "mixtral":
        d.update(num_local_experts=cfg.n_expert, num_experts_per_tok=cfg.n_expert_per_tok,
                 router_aux_loss_coef=cfg.router_aux_loss_coef)


def attention_rules(R: Rules, cfg: ModelConfig, b: str, h: str) -> None:
    """Block `b`'s fused qkv (+ biases, q/k norms) and output projection from HF `h`self_attn.{q,k,v,o}_proj."""
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    qkv = [h + f"self_attn.{n}_proj" for n in "qkv"]
    sizes = [nh * hd, nkv * hd, nkv * hd]
    R.add(b + "attn.qkv.weight", [n + ".weight" for n in qkv], "cat", sizes)
    if cfg.qkv_bias:
        R.add(b + "attn.qkv.bias", [n + ".bias" for n in qkv], "cat", sizes)
    R.add(b + "attn.proj.weight", h + "self_attn.o_proj.weight")
    if cfg.attn_out_bias:
        R.add(b + "attn.proj.bias", h + "self_attn.o_proj.bias")
    if cfg.qk_norm:
        R.add(b + "attn.q_norm.weight", h + "self_attn.q_norm.weight")
        R.add(b + "attn.k_norm.weight", h + "self_attn.k_norm.weight")


def rules(cfg: ModelConfig, p: str, fused_experts: bool = False) -> Rules:
    R = Rules()
    inter = cfg.intermediate_size
    R.add("wte.weight", f"{p}embed_tokens.weight")
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"{p}layers.{i}."
        R.add(b + "ln_1.weight", h + "input_layernorm.weight")
        R.add(b + "ln_2.weight", h + "post_attention_layernorm.weight")
        attention_rules(R, cfg, b, h)
        if cfg.n_expert and fused_experts:  # transformers 5 in-memory layout
            R.add(b + "mlp.router.weight", h + "mlp.gate.weight")
            R.add(b + "mlp.w_fc", h + "mlp.experts.gate_up_proj")
            R.add(b + "mlp.w_proj", h + "mlp.experts.down_proj")
        elif cfg.n_expert:  # the published Mixtral layout
            m = h + "block_sparse_moe."
            R.add(b + "mlp.router.weight", m + "gate.weight")
            pairs = [m + f"experts.{e}.{w}.weight" for e in range(cfg.n_expert) for w in ("w1", "w3")]
            R.add(b + "mlp.w_fc", pairs, "stack_cat", [inter, inter])
            R.add(b + "mlp.w_proj", [m + f"experts.{e}.w2.weight" for e in range(cfg.n_expert)], "stack")
        else:
            gu = [h + "mlp.gate_proj", h + "mlp.up_proj"]
            R.add(b + "mlp.fc.weight", [n + ".weight" for n in gu], "cat", [inter, inter])
            if cfg.mlp_bias:
                R.add(b + "mlp.fc.bias", [n + ".bias" for n in gu], "cat", [inter, inter])
            R.add(b + "mlp.proj.weight", h + "mlp.down_proj.weight")
            if cfg.mlp_bias:
                R.add(b + "mlp.proj.bias", h + "mlp.down_proj.bias")
    R.add("ln_f.weight", f"{p}norm.weight")
    if not cfg.tie_embeddings:
        R.add("lm_head.weight", "lm_head.weight")
    return R


for _mt, _arch in (("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
                   ("mistral", "MistralForCausalLM"), ("mixtral", "MixtralForCausalLM")):
    register(Family(_mt, _arch, config_from_hf, config_to_hf, rules, anchor="embed_tokens.weight",
                    load_prefixes=("model.", ""), save_prefix="model."))
