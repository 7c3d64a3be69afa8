"""Models trained here (`model_type: llmkit`): config.json is `ModelConfig` itself, tensors keep our names."""

from __future__ import annotations

from typing import Any

from llmkit.model.config import ModelConfig
from llmkit.model.families import Family, Rules, register


def config_from_hf(d: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict({k: v for k, v in d.items() if k not in ("architectures", "torch_dtype")})


def config_to_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    d.update({k: v for k, v in cfg.to_dict().items() if k != "extra"})


def rules(cfg: ModelConfig, p: str, fused_experts: bool = False) -> Rules:
    """Identity rules are built from the model's own state_dict (see `hf.hf_to_llmkit`)."""
    return Rules()


register(Family("llmkit", "LlmkitForCausalLM", config_from_hf, config_to_hf, rules, anchor="wte.weight",
                load_prefixes=("",), save_prefix=""))
