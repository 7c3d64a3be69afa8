"""Sentence embeddings from an encoder: mean pooling over real tokens, then L2 normalisation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from llmkit.errors import InputError
from llmkit.model.hf import load_model
from llmkit.tokenizer import load_tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the hidden states [B, T, C] over positions where attention_mask [B, T] is 1."""
    m = attention_mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _max_length(model, path: Path | None) -> int:
    if path is not None and (path / "sentence_bert_config.json").exists():  # sentence-transformers' limit
        return int(json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length", 512))
    return model.config.block_size


@torch.inference_mode()
def embed(model_or_path, texts: list[str], tokenizer=None, batch_size: int = 32,
          normalize: bool = True) -> torch.Tensor:
    """L2-normalised, mean-pooled sentence embeddings `[len(texts), dim]` (float32).

    `model_or_path` is a model folder (loaded with its tokenizer) or a loaded encoder plus `tokenizer`.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise InputError("embed() needs at least one text")
    path = None
    if isinstance(model_or_path, str | os.PathLike):
        path = Path(model_or_path)
        model = load_model(path)
        tokenizer = tokenizer or load_tokenizer(path)
    else:
        model = model_or_path
        path = Path(model.name_or_path) if getattr(model, "name_or_path", None) else None
    if tokenizer is None:
        raise InputError("embed() needs a tokenizer when given a model object")
    max_len = _max_length(model, path)
    pad = tokenizer.pad_token_id or 0
    out = []
    for i in range(0, len(texts), batch_size):
        ids = [tokenizer.encode(t)[:max_len] for t in texts[i : i + batch_size]]
        T = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [pad] * (T - len(x)) for x in ids], device=model.device)
        mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids], device=model.device)
        hidden = model(input_ids, attention_mask=mask)
        if hidden.shape[-1] == model.config.vocab_size and model.config.model_type != "bert":
            raise InputError("embed() needs an encoder (BERT-style) model, got a causal LM")
        e = mean_pool(hidden.float(), mask)
        out.append(F.normalize(e, dim=-1) if normalize else e)
    return torch.cat(out)
