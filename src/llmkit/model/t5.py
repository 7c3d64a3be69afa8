"""T5 / mT5 encoder-decoder (Raffel et al., 2020): pre-RMSNorm blocks without biases, relative
position buckets (a learned bias per head, computed by the first layer of each stack and shared),
unscaled dot-product attention, decoder blocks with self-attention, cross-attention over the encoder
output and a (gated-)GELU/ReLU MLP.

`model(input_ids, decoder_input_ids=...) -> logits [B, T_dec, V]`. Generation encodes once
(`encode`) and then runs `decode` step by step: the decoder's self-attention keys/values go through
the same `kv_cache.update` hook as the decoder-only model, and the cross-attention keys/values are
computed once per layer and kept in the `EncoderOutput` (the cross KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import InputError
from llmkit.model import hf
from llmkit.model.attention import AttnMeta
from llmkit.model.config import ModelConfig
from llmkit.model.layers import EmbeddingModel, check_token_ids, embedding, make_norm
from llmkit.model.positions import relative_position_bucket
from llmkit.model.transformer import MLP


@dataclass
class EncoderOutput:
    """The encoder's output for a batch and, per decoder layer, its cross-attention keys/values."""

    hidden: torch.Tensor  # [B, S, C]
    key_mask: torch.Tensor | None  # [B, S] 1 = real token
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> [B, H, S, D] x 2

    def select(self, rows: list[int]) -> EncoderOutput:
        """The same output for a subset of the batch rows."""
        idx = torch.tensor(rows, device=self.hidden.device)
        mask = self.key_mask[idx] if self.key_mask is not None else None
        return EncoderOutput(self.hidden[idx], mask, {i: (k[idx], v[idx]) for i, (k, v) in self.kv.items()})


def _attend(q, k, v, bias):
    """softmax(q k^T + bias) v: T5 does not scale the scores by 1/sqrt(d)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


class T5SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.n_head, self.head_dim = layer_idx, cfg.n_head, cfg.head_dim
        inner = cfg.n_head * cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, kv_cache: Any = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3 * self.n_head, self.head_dim).transpose(1, 2).chunk(3, dim=1)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, H, S, D]
        return self.proj(_attend(q, k, v, bias).transpose(1, 2).reshape(B, T, -1))


class T5CrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.n_head, self.head_dim = layer_idx, cfg.n_head, cfg.head_dim
        inner = cfg.n_head * cfg.head_dim
        self.q = nn.Linear(cfg.n_embd, inner, bias=False)
        self.kv = nn.Linear(cfg.n_embd, 2 * inner, bias=False)
        self.proj = nn.Linear(inner, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, enc: EncoderOutput, bias: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.layer_idx not in enc.kv:  # computed once per encoder output, reused every decode step
            S = enc.hidden.shape[1]
            kv = self.kv(enc.hidden).view(B, S, 2 * self.n_head, self.head_dim).transpose(1, 2)
            enc.kv[self.layer_idx] = kv.chunk(2, dim=1)
        k, v = enc.kv[self.layer_idx]
        return self.proj(_attend(q, k, v, bias).transpose(1, 2).reshape(B, T, -1))


class T5Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, decoder: bool) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = T5SelfAttention(cfg, layer_idx)
        if decoder:
            self.ln_x = make_norm(cfg)
            self.xattn = T5CrossAttention(cfg, layer_idx)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, bias, enc=None, cross_bias=None, kv_cache=None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), bias, kv_cache))
        if enc is not None:
            x = x + self.drop(self.xattn(self.ln_x(x), enc, cross_bias))
        return x + self.drop(self.mlp(self.ln_2(x)))


class T5Model(EmbeddingModel):
    """Encoder-decoder LM: `model(input_ids, decoder_input_ids=...) -> logits [B, T_dec, vocab]`."""

    is_encoder_decoder = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.wte = embedding(cfg.vocab_size, cfg.n_embd)  # shared by encoder and decoder
        self.enc_rel_bias = embedding(cfg.rel_buckets, cfg.n_head)
        self.enc = nn.ModuleList(T5Block(cfg, i, decoder=False) for i in range(cfg.n_layer))
        self.enc_ln_f = make_norm(cfg)
        self.dec_rel_bias = embedding(cfg.rel_buckets, cfg.n_head)
        self.dec = nn.ModuleList(T5Block(cfg, i, decoder=True) for i in range(cfg.n_decoder_layer))
        self.dec_ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.drop = nn.Dropout(cfg.dropout)
        self.check_inputs = True
        self.aux_loss = torch.zeros(())
        if self.wte.weight.device.type != "meta":
            self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            std = self.config.initializer_range if isinstance(m, nn.Linear) else 1.0
            nn.init.normal_(m.weight, 0.0, std)

    # ------------------------------------------------------------------ forward
    def _rel_bias(self, table: nn.Embedding, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool):
        """Position bias [B|1, H, T, S] from query columns [B|1, T] and key columns [S]."""
        rel = k_pos[None, None, :] - q_pos[:, :, None]  # [B, T, S]
        cfg = self.config
        buckets = relative_position_bucket(rel, not causal, cfg.rel_buckets, cfg.rel_max_distance)
        return table(buckets).permute(0, 3, 1, 2)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderOutput:
        """Run the encoder once: hidden states [B, S, C] plus the padding mask (for cross-attention)."""
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be 2-D [batch, seq], got shape {tuple(input_ids.shape)}")
        if self.check_inputs:
            check_token_ids(input_ids, self.config.vocab_size)
        S = input_ids.shape[1]
        cols = torch.arange(S, device=input_ids.device)
        bias = self._rel_bias(self.enc_rel_bias, cols[None], cols, causal=False).to(self.dtype)
        if attention_mask is not None:
            bias = bias.masked_fill(~attention_mask[:, None, None, :].bool(), float("-inf"))
        x = self.drop(self.wte(input_ids))
        for blk in self.enc:
            x = blk(x, bias)
        return EncoderOutput(self.drop(self.enc_ln_f(x)), attention_mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,  # [B, T]
        enc: EncoderOutput,
        decoder_attention_mask: torch.Tensor | None = None,  # [B, S_dec]
        kv_cache: Any = None,
        attn_meta: AttnMeta | None = None,
        num_logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Decoder logits [B, T, V] (or the last `num_logits_to_keep`) given the encoder output."""
        cfg = self.config
        ids = decoder_input_ids
        meta = attn_meta
        if meta is None:
            if self.check_inputs:
                check_token_ids(ids, cfg.vocab_size, "decoder token ids")
            past = kv_cache.get_seq_length() if kv_cache is not None and hasattr(kv_cache, "get_seq_length") else 0
            meta = AttnMeta.for_inputs(ids, past, decoder_attention_mask)
        T, S = meta.q_len, meta.kv_len
        q_cols = meta.q_cols if meta.q_cols is not None else torch.arange(S - T, S, device=ids.device)[None]
        bias = self._rel_bias(self.dec_rel_bias, q_cols, torch.arange(S, device=ids.device), causal=True)
        bias = bias.to(self.dtype).masked_fill(~meta.mask(None, explicit=True), float("-inf"))
        cross = None
        if enc.key_mask is not None:  # [B, 1, 1, S_enc] additive
            cross = torch.zeros(enc.key_mask.shape, dtype=self.dtype, device=ids.device)
            cross = cross.masked_fill(~enc.key_mask.bool(), float("-inf"))[:, None, None, :]
        x = self.drop(self.wte(ids))
        for blk in self.dec:
            x = blk(x, bias, enc, cross, kv_cache)
        if num_logits_to_keep:
            x = x[:, -num_logits_to_keep:]
        x = self.drop(self.dec_ln_f(x))
        if cfg.scale_decoder_outputs:
            x = x * cfg.n_embd**-0.5
        return self.lm_head(x)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] encoder tokens
        decoder_input_ids: torch.Tensor | None = None,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, S]
        decoder_attention_mask: torch.Tensor | None = None,  # [B, T]
        encoder_output: EncoderOutput | None = None,
    ) -> torch.Tensor:
        """Logits [B, T_dec, vocab] of the decoder tokens given the encoder tokens (teacher forcing)."""
        if decoder_input_ids is None:
            raise InputError("a T5 model needs decoder_input_ids: model(input_ids, decoder_input_ids=...)")
        enc = encoder_output if encoder_output is not None else self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, enc, decoder_attention_mask)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: decoder_start_token_id then labels[:-1] (-100 -> pad)."""
        start = self.config.decoder_start_token_id
        start = start if start is not None else (self.config.pad_token_id or 0)
        out = labels.new_full(labels.shape, start)
        out[:, 1:] = labels[:, :-1]
        return out.masked_fill(out == -100, self.config.pad_token_id or 0)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str, max_shard_size: int = 5 * 2**30) -> None:
        """Write a Hugging Face folder (config.json + safetensors) atomically."""
        hf.save_pretrained(self, path, max_shard_size=max_shard_size)


hf.MODEL_CLASSES["seq2seq"] = T5Model
