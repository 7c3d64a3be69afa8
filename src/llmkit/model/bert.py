"""BERT-style bidirectional encoder (Devlin et al., 2019): post-LN blocks, absolute positions, token types."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import InputError
from llmkit.model import hf
from llmkit.model.config import ModelConfig
from llmkit.model.layers import ACTIVATIONS, EmbeddingModel, check_token_ids, embedding


class BertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, nh = cfg.n_embd, cfg.n_head
        self.n_head, self.head_dim = nh, C // nh
        self.qkv = nn.Linear(C, 3 * C)
        self.attn_out = nn.Linear(C, C)
        self.ln_attn = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.fc = nn.Linear(C, cfg.intermediate_size)
        self.proj = nn.Linear(cfg.intermediate_size, C)
        self.ln_mlp = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.act = ACTIVATIONS[cfg.activation]
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(C, -1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, nh, T, hd]
        x = self.ln_attn(x + self.drop(self.attn_out(y.transpose(1, 2).reshape(B, T, C))))
        return self.ln_mlp(x + self.drop(self.proj(self.act(self.fc(x)))))


class BertModel(EmbeddingModel):
    """`model(input_ids, attention_mask, token_type_ids) -> last hidden states [B, T, C]`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.wte = embedding(cfg.vocab_size, cfg.n_embd, padding_idx=cfg.pad_token_id)
        self.wpe = embedding(cfg.block_size, cfg.n_embd)
        self.wtt = embedding(cfg.type_vocab_size, cfg.n_embd)
        self.ln_emb = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.n_layer))
        self.pooler = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.check_inputs = True
        if self.wte.weight.device.type != "meta":
            self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, 0.0, self.config.initializer_range)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, T] 1 = token, 0 = padding
        token_type_ids: torch.Tensor | None = None,  # [B, T]
    ) -> torch.Tensor:
        cfg = self.config
        B, T = input_ids.shape
        if self.check_inputs:
            check_token_ids(input_ids, cfg.vocab_size)
        if T > cfg.block_size:
            raise InputError(f"sequence of {T} tokens exceeds the encoder's {cfg.block_size} positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)[None]
        x = self.drop(self.ln_emb(self.wte(input_ids) + self.wpe(pos) + self.wtt(token_type_ids)))
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()  # [B,1,1,T]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler: tanh(W h_[CLS] + b), [B, C]."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def save_pretrained(self, path: str, max_shard_size: int = 5 * 2**30) -> None:
        hf.save_pretrained(self, path, max_shard_size=max_shard_size)


hf.MODEL_CLASSES["encoder"] = BertModel


class BertForMaskedLM(nn.Module):
    """BertModel plus BERT's MLM head (dense + GELU + LayerNorm, decoder tied to the word embeddings).

    `model(input_ids, attention_mask, token_type_ids) -> logits [B, T, V]`. `save_pretrained` writes a
    `BertForMaskedLM` folder (`bert.` prefix + `cls.predictions.*`) that `transformers` loads, and that
    `llmkit.load_model` / `llmkit.embed` read as the bare encoder.
    """

    def __init__(self, config: ModelConfig, nsp: bool = False) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.seq_relationship = nn.Linear(config.n_embd, 2) if nsp else None  # next-sentence head on the pooler
        C = config.n_embd
        self.transform = nn.Linear(C, C)
        self.act = ACTIVATIONS[config.activation]
        self.ln = nn.LayerNorm(C, eps=config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        nn.init.normal_(self.transform.weight, 0.0, config.initializer_range)
        nn.init.zeros_(self.transform.bias)
        if nsp:
            nn.init.normal_(self.seq_relationship.weight, 0.0, config.initializer_range)
            nn.init.zeros_(self.seq_relationship.bias)

    @property
    def check_inputs(self) -> bool:
        return self.bert.check_inputs

    @check_inputs.setter
    def check_inputs(self, value: bool) -> None:
        self.bert.check_inputs = value

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.bert.wte.weight.numel() if exclude_embeddings else n

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, return_nsp: bool = False):
        """MLM logits [B, T, V]; with `return_nsp` also the next-sentence logits [B, 2] (0 = IsNext)."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids)  # [B, T, C]
        h = self.ln(self.act(self.transform(hidden)))
        logits = F.linear(h, self.bert.wte.weight, self.bias)  # [B, T, V]
        if return_nsp:
            return logits, self.seq_relationship(self.bert.pool(hidden))
        return logits

    def save_pretrained(self, path: str, max_shard_size: int = 5 * 2**30) -> None:
        head = {"cls.predictions.transform.dense.weight": self.transform.weight,
                "cls.predictions.transform.dense.bias": self.transform.bias,
                "cls.predictions.transform.LayerNorm.weight": self.ln.weight,
                "cls.predictions.transform.LayerNorm.bias": self.ln.bias,
                "cls.predictions.bias": self.bias, "cls.predictions.decoder.bias": self.bias,
                "cls.predictions.decoder.weight": self.bert.wte.weight}
        arch = "BertForMaskedLM"
        if self.seq_relationship is not None:  # BertForPreTraining: both heads
            head.update({"cls.seq_relationship.weight": self.seq_relationship.weight,
                         "cls.seq_relationship.bias": self.seq_relationship.bias})
            arch = "BertForPreTraining"
        hf.save_pretrained(self.bert, path, max_shard_size=max_shard_size, prefix="bert.",
                           extra={k: v.detach() for k, v in head.items()}, architecture=arch)
