"""Prompt tuning (Lester et al., 2021): N trainable "virtual token" embeddings before every input.

The base model is untouched: `PromptEmbedding` is swapped in for its token embedding and looks
up ids >= vocab_size in the prompt table, and `PromptTuningModel` prepends those N ids to each
sequence (positions 0..N-1, as PEFT does) and drops their logits, so callers see the same
`model(input_ids, ...) -> logits [B, T, V]` interface. With a KV cache the prefix is fed once,
on the first call.

Serving several soft prompts from one model (`add_prompt_adapter`): each named prompt owns a
range of virtual ids in one table, and a request for it starts with `virtual_prefix(model, name)`,
so requests for different prompts, LoRA adapters and the base share a batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import InputError
from llmkit.model.attention import AttnMeta
from llmkit.model.layers import check_token_ids


class PromptEmbedding(nn.Module):
    """The model's embedding for ids < vocab_size, the prompt table for the N ids above it."""

    def __init__(self, wte: nn.Embedding, num_virtual_tokens: int) -> None:
        super().__init__()
        self.wte = wte
        self.vocab_size = wte.num_embeddings
        self.prompt = nn.Parameter(torch.zeros(num_virtual_tokens, wte.embedding_dim, dtype=wte.weight.dtype,
                                               device=wte.weight.device))
        self.ranges: dict[str, tuple[int, int]] = {}  # served prompt name -> (first row, rows)

    @property
    def weight(self) -> torch.Tensor:  # the token table (tied heads and init code read it)
        return self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, C]
        virtual = ids >= self.vocab_size
        x = self.wte(ids.masked_fill(virtual, 0))
        if virtual.any():
            x = torch.where(virtual[..., None], F.embedding((ids - self.vocab_size).clamp(min=0), self.prompt), x)
        return x


class PromptTuningModel(nn.Module):
    """A Transformer with a trained soft prompt; `forward` has the Transformer's signature."""

    def __init__(self, model: nn.Module, num_virtual_tokens: int) -> None:
        super().__init__()
        if num_virtual_tokens < 1:
            raise InputError(f"num_virtual_tokens={num_virtual_tokens} must be at least 1")
        self.model = model
        self.num_virtual_tokens = num_virtual_tokens
        model.set_submodule("wte", PromptEmbedding(model.wte, num_virtual_tokens))
        self.config = model.config

    @property
    def prompt(self) -> nn.Parameter:
        return self.model.wte.prompt

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def num_params(self, exclude_embeddings: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_from_text(self, ids: list[int]) -> None:
        """Initialise the prompt from token embeddings of a text, repeated to N (PEFT's TEXT init)."""
        N = self.num_virtual_tokens
        if not ids:
            raise InputError("--prompt-tuning-init-text encodes to no tokens; give a non-empty text")
        ids = (ids * (N // len(ids) + 1))[:N]
        with torch.no_grad():
            self.prompt.copy_(self.model.wte.wte.weight[torch.tensor(ids, device=self.prompt.device)])

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, T] (no cache: the caller's columns only)
        position_ids: torch.Tensor | None = None,  # [B, T], counted without the virtual tokens
        kv_cache=None,
        num_logits_to_keep: int = 0,
        attn_meta: AttnMeta | None = None,  # the caller's view (without the virtual tokens)
    ) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be 2-D [batch, seq], got shape {tuple(input_ids.shape)}")
        check_token_ids(input_ids, self.config.vocab_size)  # ids >= vocab_size are ours alone
        B, T = input_ids.shape
        N = self.num_virtual_tokens
        first = kv_cache is None or kv_cache.get_seq_length() == 0
        if first:
            virtual = torch.arange(self.config.vocab_size, self.config.vocab_size + N, device=input_ids.device)
            input_ids = torch.cat([virtual.expand(B, N), input_ids], 1)
        if kv_cache is not None and hasattr(kv_cache, "attn_meta"):  # the cache counts our columns too
            meta = kv_cache.attn_meta(input_ids.shape[1])
        else:  # one plain forward: the virtual tokens at positions 0..N-1, the caller's after them
            if attn_meta is not None:
                position_ids, attention_mask = attn_meta.position_ids, attn_meta.key_mask
            if position_ids is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            pos = torch.cat([torch.arange(N, device=input_ids.device).expand(B, N), position_ids + N], 1)
            mask = None if attention_mask is None else torch.cat([attention_mask.new_ones(B, N), attention_mask], 1)
            meta = AttnMeta(pos, N + T, key_mask=mask)
        logits = self.model(input_ids, position_ids=meta.position_ids, kv_cache=kv_cache, attn_meta=meta,
                            num_logits_to_keep=num_logits_to_keep)
        return logits[:, N:] if first and not num_logits_to_keep else logits


# ---------------------------------------------------------------------------- serving many prompts


def add_prompt_adapter(model: nn.Module, name: str, prompt: torch.Tensor) -> None:
    """Give `model` soft prompt `name` ([N, n_embd]) to serve: requests start with its virtual ids."""
    if not isinstance(model.wte, PromptEmbedding):
        model.set_submodule("wte", PromptEmbedding(model.wte, 0))
    emb = model.wte
    if name in emb.ranges:
        raise InputError(f"a soft prompt named {name!r} is already loaded")
    start = emb.prompt.shape[0]
    with torch.no_grad():
        rows = torch.cat([emb.prompt.detach(), prompt.to(emb.prompt.dtype).to(emb.prompt.device)])
    emb.prompt = nn.Parameter(rows, requires_grad=False)
    emb.ranges[name] = (start, prompt.shape[0])


def prompt_adapter_names(model: nn.Module) -> list[str]:
    """Names of the soft prompts `add_prompt_adapter` gave `model`."""
    emb = getattr(model, "wte", None)
    return list(emb.ranges) if isinstance(emb, PromptEmbedding) else []


def virtual_prefix(model: nn.Module, name: str) -> list[int]:
    """The virtual token ids a request for soft prompt `name` starts with (positions 0..N-1, as PEFT)."""
    start, n = model.wte.ranges[name]
    V = model.wte.vocab_size
    return list(range(V + start, V + start + n))

