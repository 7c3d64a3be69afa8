"""One config dataclass for every model family llmkit runs."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import ConfigError
from llmkit.model.presets import PRESETS

DECODER_FAMILIES = ("llmkit", "gpt2", "llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma2", "gemma3_text", "phi3")
FAMILIES = DECODER_FAMILIES + ("bert", "t5", "mt5")
POSITIONS = ("rope", "learned", "alibi", "sinusoidal", "none")


@dataclass
class ModelConfig:
    """Architecture of a Transformer. Field names follow nanoGPT/litgpt; `hf.py` maps HF names."""

    model_type: str = "llmkit"  # one of FAMILIES; decides the Hugging Face name mapping
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None = n_head (MHA); 1 = MQA; else GQA
    n_embd: int = 768
    head_dim: int | None = None  # None = n_embd // n_head
    intermediate_size: int | None = None  # None = 4 * n_embd
    block_size: int = 2048  # max positions (learned/sinusoidal tables, context limit)
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm's additive bias (nanoGPT's bias=False drops it)
    mlp: str = "swiglu"  # swiglu | gelu (2-layer MLP)
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu
    pos: str = "rope"  # rope | learned | alibi | sinusoidal | none
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": linear|dynamic|llama3, "factor": ...}
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer: "full_attention" | "sliding_attention"
    n_expert: int = 0  # > 0: sparse Mixture-of-Experts MLP
    n_expert_per_tok: int = 2
    router_aux_loss_coef: float = 0.01
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    post_norms: bool = False  # extra norms on the attention and MLP outputs before the residual add (Gemma 2/3)
    scale_embeddings: bool = False  # token embeddings times sqrt(n_embd) (Gemma)
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    rope_local_theta: float | None = None  # RoPE base of sliding-window layers when it differs (Gemma 3)
    tie_embeddings: bool = False
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # encoder (BERT) only
    type_vocab_size: int = 2
    # encoder-decoder (T5) only: n_layer is the encoder's depth
    n_decoder_layer: int | None = None  # None = n_layer
    rel_buckets: int = 32  # relative-position buckets (Raffel et al., 2020)
    rel_max_distance: int = 128
    decoder_start_token_id: int | None = None
    scale_decoder_outputs: bool = False  # decoder output times n_embd ** -0.5 before the head (T5 v1.0)
    extra: dict[str, Any] = field(default_factory=dict)  # HF keys kept for a faithful round trip

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise ConfigError(f"unknown model_type {self.model_type!r}; expected one of {', '.join(FAMILIES)}")
        if self.pos not in POSITIONS:
            raise ConfigError(f"unknown pos {self.pos!r}; expected one of {', '.join(POSITIONS)}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"unknown norm {self.norm!r}; expected rmsnorm or layernorm")
        if self.mlp not in ("swiglu", "gelu"):
            raise ConfigError(f"unknown mlp {self.mlp!r}; expected swiglu or gelu")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list | tuple) else [self.eos_token_id]

    @property
    def rope_type(self) -> str:
        """The RoPE scaling kind: default, linear, dynamic, llama3 or longrope (HF's old key `type` accepted)."""
        sc = self.rope_scaling or {}
        return sc.get("rope_type", sc.get("type", "default"))

    def window_for_layer(self, i: int) -> int | None:
        """Sliding-window size of layer `i`, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[i] != "sliding_attention":
            return None
        return self.sliding_window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict, rejecting unknown keys with a suggestion."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown model config key(s): {', '.join(hints)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], **overrides})
