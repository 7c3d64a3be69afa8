"""One spec per model family: its config.json mapping, checkpoint prefixes and weight rules.

`model/hf.py` looks a family up here (`get_family(model_type)`) instead of branching on
`model_type`; adding a family means adding one module to this package (plus its test), as
litgpt's config registry does. A rule maps one llmkit tensor to Hugging Face tensors:
(ours, [hf names], op, split sizes) with ops "id" copy, "cat" concatenate on dim 0, "t" transpose
(GPT-2 Conv1D), "stack" stack experts, "stack_cat" stack experts, each the concatenation of a pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmkit.errors import ConfigError
from llmkit.model.config import ModelConfig

Rule = tuple[str, list[str], str, list[int]]

ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def act_from_hf(name: str) -> str:
    if name not in ACT_FROM_HF:
        raise ConfigError(f"unsupported activation {name!r}; supported: {', '.join(ACT_FROM_HF)}")
    return ACT_FROM_HF[name]


class Rules(list):
    """A list of `Rule`s with `add(ours, hf, op="id", sizes=None)`."""

    def add(self, ours: str, hf: str | list[str], op: str = "id", sizes: list[int] | None = None) -> None:
        self.append((ours, [hf] if isinstance(hf, str) else hf, op, sizes or []))


@dataclass(frozen=True)
class Family:
    """Everything llmkit knows about one Hugging Face model family."""

    model_type: str
    architecture: str  # config.json "architectures"
    config_from_hf: Callable[[dict[str, Any], dict[str, Any]], ModelConfig]  # (config.json, common fields)
    config_to_hf: Callable[[ModelConfig, dict[str, Any]], None]  # fills the config.json dict in place
    rules: Callable[[ModelConfig, str, bool], Rules]  # (cfg, checkpoint prefix, fused experts)
    anchor: str  # the embedding tensor (without prefix) that finds a checkpoint's prefix
    load_prefixes: tuple[str, ...]  # prefixes a checkpoint may use, tried in order
    save_prefix: str
    encoder: bool = False  # BertModel rather than Transformer
    seq2seq: bool = False  # T5Model (encoder-decoder) rather than Transformer
    ignorable_roots: tuple[str, ...] = ()  # top-level names of heads we do not use


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def get_family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise ConfigError(f"unsupported model_type {model_type!r}; llmkit loads: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


from llmkit.model.families import bert, gemma, gpt2, llama, llmkit, phi3, t5  # noqa: E402,F401  (each registers its spec)
