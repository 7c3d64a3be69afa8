"""Adapter folders in PEFT's format: LoRA and prompt tuning, in and out.

A folder holds `adapter_config.json` and `adapter_model.safetensors` with PEFT's tensor names
(`base_model.model.<HF module>.lora_A.weight`, `prompt_embeddings`), so `peft.PeftModel.from_pretrained`
loads what llmkit writes and llmkit loads what PEFT writes. llmkit's fused q/k/v and gate/up
projections map to Hugging Face's separate modules part by part (see `lora.py`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmkit.errors import CheckpointError, LlmkitError
from llmkit.fsutil import write_dir
from llmkit.model.hf import load_model
from llmkit.model.lora import (
    EMBED,
    LoRAConfig,
    lora_modules,
    merge_lora,
    projection_sites,
    set_active_adapter,
    wrap_site,
)
from llmkit.model.prompt_tuning import PromptTuningModel, add_prompt_adapter
from llmkit.tokenizer import load_tokenizer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LLAMA_LIKE = ("llama", "qwen2", "mistral", "mixtral")
_PEFT_PREFIX = "base_model.model."


def hf_module_name(model_type: str, path: str, part: str) -> str:
    """The Hugging Face module that holds `part` of llmkit projection `path` (blocks.3.attn.qkv, 'k')."""
    if path == "wte":  # the token embedding
        return {"gpt2": "transformer.wte"}.get(model_type, "model.embed_tokens" if model_type in _LLAMA_LIKE
                                               else "wte")
    _, i, kind, _ = path.split(".")
    if model_type in _LLAMA_LIKE:
        sub = "self_attn" if kind == "attn" else "mlp"
        return f"model.layers.{i}.{sub}.{part}_proj"
    if model_type == "gpt2":
        name = {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}[part]
        return f"transformer.h.{i}.{name}"
    return f"blocks.{i}.{kind}.{part}_proj"  # llmkit's own family


def _module_map(model: nn.Module) -> dict[str, tuple[str, str]]:
    """HF module name -> (llmkit projection path, part) for every adaptable part of `model`."""
    mt = model.config.model_type
    return {hf_module_name(mt, path, p): (path, p) for path, layout in projection_sites(model).items()
            for p, _ in layout}


def _atomic_write(out: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS_NAME,
                  metadata={"format": "pt"})

    write_dir(Path(out), write, carry_over=lambda name: name not in (CONFIG_NAME, WEIGHTS_NAME))


# ---------------------------------------------------------------------------- LoRA


def save_lora(model: nn.Module, out: str | Path, cfg: LoRAConfig, name: str = "default",
              base_model_name_or_path: str | None = None) -> None:
    """Write adapter `name` of `model` as a PEFT LoRA folder."""
    mt = model.config.model_type
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    for path, m in lora_modules(model).items():
        if name not in m.adapters:
            continue
        ad = m.adapters[name]
        for part in ad.lora_A:
            hf = hf_module_name(mt, path, part)
            modules.append(hf)
            a, b = ("lora_embedding_A", "lora_embedding_B") if part == EMBED else ("lora_A.weight", "lora_B.weight")
            tensors[f"{_PEFT_PREFIX}{hf}.{a}"] = ad.lora_A[part].float()
            tensors[f"{_PEFT_PREFIX}{hf}.{b}"] = ad.lora_B[part].float()
    if not tensors:
        raise CheckpointError(f"the model has no LoRA adapter named {name!r} to save")
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    every = {m for m in _module_map(model) if m.rsplit(".", 1)[-1] in short}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        # short names when they select exactly the adapted modules, else the full names (GPT-2's c_proj)
        "target_modules": short if every == set(modules) else sorted(modules),
        "bias": "none",
        "fan_in_fan_out": mt == "gpt2",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    _atomic_write(Path(out), config, tensors)


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_(?:([AB])(?:\.[^.]+)?\.weight|embedding_([AB]))$")


def _same_embedding(model: nn.Module, mmap: dict[str, tuple[str, str]], key: str, t: torch.Tensor,
                    path: str | Path) -> bool:
    """True for a saved embedding table equal to the model's own; an error for one that differs."""
    hf = key.removeprefix(_PEFT_PREFIX).removesuffix(".base_layer.weight")
    if mmap.get(hf, ("", ""))[1] != EMBED:
        return False
    wte = model.get_submodule("wte")
    own = getattr(wte, "base", wte).weight
    if t.shape != own.shape or not torch.equal(t.to(own.dtype), own.detach().cpu()):
        raise CheckpointError(f"{path}: the adapter carries its own embedding table ({key}, e.g. a resized "
                              "vocabulary), which differs from the base model's; llmkit does not load that")
    return True


def load_lora(model: nn.Module, path: str | Path, name: str = "default") -> LoRAConfig:
    """Add the PEFT LoRA adapter in folder `path` to `model` as adapter `name` (made active)."""
    config, sd = read_adapter(path)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: adapter_config.json has peft_type {config.get('peft_type')!r}; expected LORA")
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias"):
        if config.get(key):
            raise CheckpointError(f"{path}: adapter_config.json sets {key}={config[key]!r}, which llmkit "
                                  "does not support")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias={config['bias']!r} adapters are not supported; expected 'none'")
    mmap = _module_map(model)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in sd.items():
        if k.endswith(".base_layer.weight") and _same_embedding(model, mmap, k, t, path):
            continue  # peft saves the adapted embedding's own table too (save_embedding_layers)
        m = _LORA_KEY.match(k)
        if m is None or m.group(1) not in mmap:
            raise CheckpointError(f"{path}: tensor {k!r} is not a LoRA weight of a projection this "
                                  f"{model.config.model_type} model has")
        found.setdefault(m.group(1), {})[m.group(2) or m.group(3)] = t
    parts = sorted({mmap[hf][1] for hf in found})
    targets = sorted({t for p in parts for t in (("q", "k", "v") if p == "qkv" else (p,))})
    r = int(config.get("r", 8))
    cfg = LoRAConfig(r=r, alpha=float(config.get("lora_alpha", 8)), dropout=float(config.get("lora_dropout", 0.0)),
                     targets=targets, use_rslora=bool(config.get("use_rslora", False)))
    # add the adapter on exactly the parts present in the file, then copy the tensors in
    by_path: dict[str, list[str]] = {}
    for hf in found:
        p, part = mmap[hf]
        by_path.setdefault(p, []).append(part)
    sites = projection_sites(model)
    for p, plist in by_path.items():
        mod = wrap_site(model, p, sites[p])
        mod.add_adapter(name, [q for q, _ in sites[p] if q in plist], r, cfg.scale, cfg.dropout)
    for hf, ab in found.items():
        p, part = mmap[hf]
        ad = model.get_submodule(p).adapters[name]
        for which, t in ab.items():
            dst = (ad.lora_A if which == "A" else ad.lora_B)[part]
            if t.shape != dst.shape:
                raise CheckpointError(f"{path}: {hf}.lora_{which} has shape {tuple(t.shape)}, "
                                      f"expected {tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(t)
    set_active_adapter(model, name)
    return cfg


# ---------------------------------------------------------------------------- prompt tuning


def save_prompt_tuning(model: PromptTuningModel, out: str | Path, init_text: str | None = None,
                       base_model_name_or_path: str | None = None, tokenizer_name_or_path: str | None = None) -> None:
    """Write the soft prompt as a PEFT PROMPT_TUNING folder."""
    cfg = model.config
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": cfg.n_embd,
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.n_head,
        "num_layers": cfg.n_layer,
        "prompt_tuning_init": "TEXT" if init_text else "RANDOM",
        "prompt_tuning_init_text": init_text,
        "tokenizer_name_or_path": tokenizer_name_or_path or base_model_name_or_path,
        "inference_mode": True,
    }
    _atomic_write(Path(out), config, {"prompt_embeddings": model.prompt.float()})


def read_prompt_tuning(model: nn.Module, path: str | Path) -> torch.Tensor:
    """The soft prompt [N, n_embd] of the PEFT prompt-tuning folder `path`, checked against `model`."""
    config, sd = read_adapter(path)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r}; expected PROMPT_TUNING")
    if "prompt_embeddings" not in sd:
        raise CheckpointError(f"{path}: {WEIGHTS_NAME} has no 'prompt_embeddings' tensor")
    emb = sd["prompt_embeddings"]
    if emb.dim() != 2 or emb.shape[1] != model.config.n_embd:
        raise CheckpointError(f"{path}: prompt_embeddings has shape {tuple(emb.shape)}; "
                              f"expected [N, {model.config.n_embd}]")
    return emb


def load_prompt_tuning(model: nn.Module, path: str | Path) -> PromptTuningModel:
    """Wrap `model` with the PEFT prompt-tuning adapter in folder `path`."""
    emb = read_prompt_tuning(model, path)
    pt = PromptTuningModel(model, emb.shape[0])
    with torch.no_grad():
        pt.prompt.copy_(emb)
    return pt


def load_named_adapter(model: nn.Module, path: str | Path, name: str) -> str:
    """Load adapter folder `path` into `model` under `name` for serving beside the base: LoRA as a
    routable adapter, prompt tuning as a soft prompt with its own virtual ids. Returns the peft_type."""
    kind = adapter_type(path)
    if kind == "LORA":
        load_lora(model, path, name)
        set_active_adapter(model, None)  # requests choose their adapter
    else:
        add_prompt_adapter(model, name, read_prompt_tuning(model, path))
    return kind


# ---------------------------------------------------------------------------- either


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors of a PEFT adapter folder (safetensors, or adapter_model.bin)."""
    p = Path(path)
    if not (p / CONFIG_NAME).is_file():
        raise CheckpointError(f"{p} is not an adapter folder: expected {CONFIG_NAME} and {WEIGHTS_NAME} in it")
    try:
        config = json.loads((p / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / CONFIG_NAME} is not valid JSON: {e}") from None
    if (p / WEIGHTS_NAME).is_file():
        try:
            sd = load_file(p / WEIGHTS_NAME)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {p / WEIGHTS_NAME}: {e}") from None
    elif (p / "adapter_model.bin").is_file():
        sd = torch.load(p / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{p} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    return config, {k: v.float() for k, v in sd.items()}


def adapter_type(path: str | Path) -> str:
    """LORA or PROMPT_TUNING (PEFT's peft_type) of an adapter folder."""
    config, _ = read_adapter(path)
    kind = config.get("peft_type")
    if kind not in ("LORA", "PROMPT_TUNING"):
        raise CheckpointError(f"{path}: peft_type {kind!r} is not supported; llmkit loads LORA and PROMPT_TUNING")
    return kind


def load_adapter(model: nn.Module, path: str | Path, name: str = "default") -> nn.Module:
    """Apply the PEFT adapter folder `path` to `model` (LoRA in place; prompt tuning wraps it)."""
    if adapter_type(path) == "LORA":
        load_lora(model, path, name)
        return model
    return load_prompt_tuning(model, path)


def merge_adapter(base: str, adapter: str, out: str) -> nn.Module:
    """Load `base` with LoRA folder `adapter`, merge, and write a plain model folder (tokenizer included)."""
    if adapter_type(adapter) != "LORA":
        raise CheckpointError(f"{adapter} is not a LoRA adapter; only LoRA folds into the weights")
    model = merge_lora(load_model(base, adapter=adapter))
    model.save_pretrained(out)
    try:
        load_tokenizer(base).save(out)
    except LlmkitError:  # a base folder without tokenizer files still merges
        pass
    return model
