"""T5 and mT5 (`T5ForConditionalGeneration` / `MT5ForConditionalGeneration`): shared embeddings,
`encoder.block.{i}.layer.{0: SelfAttention, 1: DenseReluDense}`, `decoder.block.{i}.layer.{0: SelfAttention,
1: EncDecAttention, 2: DenseReluDense}`, relative attention bias in block 0 of each stack. mT5 differs
only in vocabulary and defaults (gated GELU, untied head)."""

from __future__ import annotations

from typing import Any

from llmkit.errors import ConfigError
from llmkit.model.config import ModelConfig
from llmkit.model.families import Family, Rules, act_from_hf, register


def config_from_hf(d: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    proj = d.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.split("-")[-1]
    act = "gelu_new" if proj == "gated-gelu" else act
    tie = d.get("tie_word_embeddings", True) is not False
    # T5 v1.0 scales the decoder output when the head is tied; v1.1 and mT5 do not
    scale = bool(d.get("scale_decoder_outputs", tie)) if d["model_type"] == "t5" else False
    common["pad_token_id"] = common["pad_token_id"] if common["pad_token_id"] is not None else 0
    start = d.get("decoder_start_token_id")
    return ModelConfig(
        **common, n_layer=d["num_layers"], n_decoder_layer=d.get("num_decoder_layers") or d["num_layers"],
        n_head=d["num_heads"], n_embd=d["d_model"], head_dim=d["d_kv"], intermediate_size=d["d_ff"],
        block_size=d.get("n_positions", 512), norm="rmsnorm", norm_eps=d.get("layer_norm_epsilon", 1e-6),
        mlp="swiglu" if gated else "gelu", activation=act_from_hf(act), pos="none",
        rel_buckets=d.get("relative_attention_num_buckets", 32),
        rel_max_distance=d.get("relative_attention_max_distance", 128), dropout=0.0,
        tie_embeddings=tie, scale_decoder_outputs=scale,
        decoder_start_token_id=start if start is not None else common["pad_token_id"],
    )


def config_to_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    if cfg.norm != "rmsnorm" or cfg.pos != "none" or cfg.norm_offset:
        raise ConfigError(f"model_type {cfg.model_type!r} needs norm=rmsnorm and pos=none (relative buckets)")
    act = {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation)
    proj = ("gated-" if cfg.mlp == "swiglu" else "") + act
    if cfg.model_type == "t5":
        d.update(scale_decoder_outputs=cfg.scale_decoder_outputs)
    elif cfg.scale_decoder_outputs:
        raise ConfigError("mt5 never scales the decoder output; use model_type 't5' for scale_decoder_outputs")
    d.update(d_model=cfg.n_embd, d_kv=cfg.head_dim, d_ff=cfg.intermediate_size, num_layers=cfg.n_layer,
             num_decoder_layers=cfg.n_decoder_layer, num_heads=cfg.n_head,
             relative_attention_num_buckets=cfg.rel_buckets, relative_attention_max_distance=cfg.rel_max_distance,
             layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=proj, dense_act_fn=act,
             is_gated_act=cfg.mlp == "swiglu", tie_word_embeddings=cfg.tie_embeddings,
             is_encoder_decoder=True,
             decoder_start_token_id=cfg.decoder_start_token_id, dropout_rate=cfg.dropout)


def _mlp(R: Rules, cfg: ModelConfig, b: str, h: str) -> None:
    if cfg.mlp == "swiglu":
        R.add(b + "mlp.fc.weight", [h + "DenseReluDense.wi_0.weight", h + "DenseReluDense.wi_1.weight"], "cat",
              [cfg.intermediate_size] * 2)
    else:
        R.add(b + "mlp.fc.weight", h + "DenseReluDense.wi.weight")
    R.add(b + "mlp.proj.weight", h + "DenseReluDense.wo.weight")
    R.add(b + "ln_2.weight", h + "layer_norm.weight")


def rules(cfg: ModelConfig, p: str, fused_experts: bool = False) -> Rules:
    R = Rules()
    inner = cfg.n_head * cfg.head_dim
    R.add("wte.weight", f"{p}shared.weight")
    for stack, ours, n in (("encoder", "enc", cfg.n_layer), ("decoder", "dec", cfg.n_decoder_layer)):
        R.add(f"{ours}_rel_bias.weight", f"{p}{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        for i in range(n):
            b, h = f"{ours}.{i}.", f"{p}{stack}.block.{i}.layer."
            sa = h + "0.SelfAttention."
            R.add(b + "attn.qkv.weight", [sa + f"{x}.weight" for x in "qkv"], "cat", [inner] * 3)
            R.add(b + "attn.proj.weight", sa + "o.weight")
            R.add(b + "ln_1.weight", h + "0.layer_norm.weight")
            if stack == "decoder":
                ca = h + "1.EncDecAttention."
                R.add(b + "xattn.q.weight", ca + "q.weight")
                R.add(b + "xattn.kv.weight", [ca + "k.weight", ca + "v.weight"], "cat", [inner] * 2)
                R.add(b + "xattn.proj.weight", ca + "o.weight")
                R.add(b + "ln_x.weight", h + "1.layer_norm.weight")
            _mlp(R, cfg, b, h + ("2." if stack == "decoder" else "1."))
        R.add(f"{ours}_ln_f.weight", f"{p}{stack}.final_layer_norm.weight")
    if not cfg.tie_embeddings:
        R.add("lm_head.weight", "lm_head.weight")
    return R


for _mt, _arch in (("t5", "T5ForConditionalGeneration"), ("mt5", "MT5ForConditionalGeneration")):
    register(Family(_mt, _arch, config_from_hf, config_to_hf, rules, anchor="shared.weight",
                    load_prefixes=("",), save_prefix="", seq2seq=True))
