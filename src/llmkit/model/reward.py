"""Reward models: a causal transformer whose head is a scalar `score` read at the last real token.

The head is one more kind of Linear: `lm_head` [C -> vocab] is swapped for `score` [C -> 1]
(no bias), so the model's forward is unchanged and returns [B, T, 1]. On disk a reward model is a
Hugging Face sequence-classification folder (`LlamaForSequenceClassification`, ... with
`num_labels=1`: the backbone's tensors plus `score.weight`), which
`transformers.AutoModelForSequenceClassification` loads and scores identically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from llmkit.errors import CheckpointError, ConfigError
from llmkit.fsutil import write_dir
from llmkit.model.hf import (
    _resolve,
    config_from_hf,
    config_to_hf,
    hf_to_llmkit,
    llmkit_to_hf,
    read_config,
    read_state_dict,
)
from llmkit.model.transformer import Transformer

SEQ_CLS = {"gpt2": "GPT2ForSequenceClassification"}  # others: <Family>ForCausalLM -> <Family>ForSequenceClassification


def add_score_head(model: nn.Module, std: float | None = None) -> nn.Module:
    """Turn a causal LM into a reward model in place: `lm_head` becomes `score` [C -> 1]."""
    C = model.config.n_embd
    head = nn.Linear(C, 1, bias=False, device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype)
    nn.init.normal_(head.weight, 0.0, std if std is not None else 1.0 / (C + 1) ** 0.5)  # as trl's RewardTrainer
    model.lm_head = head
    model.config = dataclasses.replace(model.config, tie_embeddings=False)
    model.is_reward_model = True
    return model


def last_token_scores(out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The score at each row's last real token; out [B, T, 1] (right-padded rows), lengths [B] -> [B]."""
    idx = (lengths - 1).clamp(min=0).to(out.device)
    return out[torch.arange(out.shape[0], device=out.device), idx, 0].float()


@torch.no_grad()
def score_ids(model: nn.Module, ids: list[list[int]], batch_size: int = 16) -> list[float]:
    """Scores of token-id sequences (right-padded batches; causal attention never sees the padding)."""
    dev = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        T = max(len(s) for s in chunk)
        x = torch.zeros((len(chunk), T), dtype=torch.long)
        for j, s in enumerate(chunk):
            x[j, : len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in chunk])
        out += last_token_scores(model(x.to(dev)), lengths).tolist()
    return out


def is_reward_folder(path: str | os.PathLike) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    arch = (json.loads(p.read_text()).get("architectures") or [""])[0]
    return arch.endswith("ForSequenceClassification")


def save_reward_model(model: nn.Module, path: str | os.PathLike, pad_token_id: int | None = None) -> None:
    """Write a Hugging Face `*ForSequenceClassification` folder (num_labels=1) atomically."""
    cfg = model.config
    backbone = dataclasses.replace(cfg, tie_embeddings=True)  # no lm_head rule: the head is `score`
    hf_cfg = config_to_hf(backbone)
    mt = hf_cfg["model_type"]
    if mt not in SEQ_CLS and not hf_cfg["architectures"][0].endswith("ForCausalLM"):
        raise ConfigError(f"no Hugging Face sequence-classification class for model_type {mt!r}")
    hf_cfg.update(architectures=[SEQ_CLS.get(mt, hf_cfg["architectures"][0].replace("ForCausalLM",
                                                                                      "ForSequenceClassification"))],
                  num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, tie_word_embeddings=False)
    if pad_token_id is not None:
        hf_cfg["pad_token_id"] = pad_token_id  # transformers finds each row's last token by it
    sd = {k: v for k, v in llmkit_to_hf(_Backbone(model, backbone)).items()}
    sd["score.weight"] = model.lm_head.weight
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    hf_cfg["torch_dtype"] = str(tensors["score.weight"].dtype).removeprefix("torch.")


    def write(tmp: Path) -> None:  # written beside, then swapped in: never a half-written folder
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})

    write_dir(path, write)


class _Backbone:
    """A view of a model under another config (for `llmkit_to_hf`, which reads config + state_dict)."""

    def __init__(self, model: nn.Module, config) -> None:
        self.model, self.config = model, config

    def state_dict(self):
        return self.model.state_dict()


def load_reward_model(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Load a `*ForSequenceClassification` folder with one label (ours or transformers') in eval mode."""
    p = _resolve(path)
    d = read_config(p)
    arch = (d.get("architectures") or ["?"])[0]
    if not arch.endswith("ForSequenceClassification"):
        raise CheckpointError(f"{p} holds a {arch}, not a reward model; expected a *ForSequenceClassification "
                              "folder (from `llmkit rm train` or transformers)")
    n_labels = d.get("num_labels", len(d.get("id2label") or {"0": 0}))
    if n_labels != 1:
        raise CheckpointError(f"{p} is a classifier with {n_labels} labels; a reward model has num_labels=1")
    cfg = dataclasses.replace(config_from_hf(d), tie_embeddings=True)
    sd = read_state_dict(p)
    if "score.weight" not in sd:
        raise CheckpointError(f"{p} has no score.weight tensor (the reward head)")
    score = sd.pop("score.weight")
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    ours = hf_to_llmkit(sd, cfg, expected)
    ours.pop("lm_head.weight", None)
    model.lm_head = nn.Linear(cfg.n_embd, 1, bias=False, device="meta")
    ours["lm_head.weight"] = score.reshape(1, cfg.n_embd)
    device = torch.device(device or "cpu")
    ours = {k: v.to(device=device, dtype=torch.float32 if device.type == "cpu" else v.dtype) for k, v in ours.items()}
    model.load_state_dict(ours, strict=True, assign=True)
    model.config = dataclasses.replace(cfg, tie_embeddings=False)
    model.init_buffers(device)
    model.name_or_path = str(p)
    model.is_reward_model = True
    model.pad_token_id = d.get("pad_token_id")
    return model.eval()
