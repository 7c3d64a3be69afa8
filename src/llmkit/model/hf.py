"""Hugging Face model folders in and out: config.json mapping, tensor-name maps, safetensors I/O.

`load_model(path)` reads config.json + (sharded) safetensors or a PyTorch .bin and returns an llmkit
model in eval mode; `save_pretrained(model, path)` writes a folder `transformers` loads unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import CheckpointError, ConfigError
from llmkit.fsutil import write_dir
from llmkit.model.config import ModelConfig
from llmkit.model.families import FAMILIES, get_family
from llmkit.model.lowrank import build_lowrank
from llmkit.model.quant import build_quantized

MODEL_CLASSES: dict[str, type] = {}  # "decoder" / "encoder" / "seq2seq" -> the class; registered by
# transformer.py / bert.py / t5.py

# ---------------------------------------------------------------------------- config.json


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face config.json dict into a ModelConfig (the family's spec does the mapping)."""
    mt = d.get("model_type")
    if mt not in FAMILIES:
        raise ConfigError(f"unsupported model_type {mt!r} in config.json; llmkit loads: {', '.join(FAMILIES)}")
    common = dict(model_type=mt, vocab_size=d["vocab_size"], bos_token_id=d.get("bos_token_id"),
                  eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"), extra=dict(d))
    try:
        return get_family(mt).config_from_hf(d, common)
    except KeyError as e:
        raise ConfigError(f"config.json of model_type {mt!r} lacks the key {e.args[0]!r}") from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json dict `transformers` expects for `cfg` (unmapped keys of a loaded model kept)."""
    fam = get_family(cfg.model_type)
    d: dict[str, Any] = {k: v for k, v in cfg.extra.items() if k not in ("transformers_version",)}
    d.update(model_type=cfg.model_type, architectures=[fam.architecture], vocab_size=cfg.vocab_size,
             torch_dtype="float32", bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
             pad_token_id=cfg.pad_token_id)
    fam.config_to_hf(cfg, d)
    return d


# ---------------------------------------------------------------------------- tensor names


# tensors a checkpoint may carry that are not weights (buffers, heads we do not use)
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "position_ids",
                       "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",  # T5: copies of shared
                       "EncDecAttention.relative_attention_bias.weight")


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    if name.endswith(_IGNORABLE_SUFFIXES):
        return True
    if name.split(".")[0] in get_family(cfg.model_type).ignorable_roots:
        return True
    return cfg.tie_embeddings and name == "lm_head.weight"


def _combine(ts: list[torch.Tensor], op: str) -> torch.Tensor:
    if op == "id":
        return ts[0]
    if op == "cat":
        return torch.cat(ts, 0)
    if op == "t":
        return ts[0].t().contiguous()
    if op == "stack":
        return torch.stack(ts)
    if op == "stack_cat":
        return torch.stack([torch.cat(ts[i : i + 2], 0) for i in range(0, len(ts), 2)])
    raise AssertionError(op)


def _split(t: torch.Tensor, op: str, sizes: list[int]) -> list[torch.Tensor]:
    if op == "id":
        return [t]
    if op == "cat":
        return list(t.split(sizes, 0))
    if op == "t":
        return [t.t()]
    if op == "stack":
        return list(t.unbind(0))
    if op == "stack_cat":
        return [part for e in t.unbind(0) for part in e.split(sizes, 0)]
    raise AssertionError(op)


def _detect_prefix(cfg: ModelConfig, names: set[str]) -> str:
    fam = get_family(cfg.model_type)
    for p in fam.load_prefixes:
        if p + fam.anchor in names:
            return p
    raise CheckpointError(f"no embedding tensor {fam.anchor!r} (with or without a model prefix) in the checkpoint; "
                          f"is config.json's model_type {cfg.model_type!r} right?")


def hf_to_llmkit(sd: dict[str, torch.Tensor], cfg: ModelConfig, expected: dict[str, torch.Size]) -> dict:
    """Convert a Hugging Face state dict to llmkit names; errors name missing/unexpected/misshapen tensors."""
    if cfg.model_type == "llmkit":  # our own names; a tied head is not stored
        rules = [(k, [k], "id", []) for k in expected if not (cfg.tie_embeddings and k == "lm_head.weight")]
    else:
        prefix = _detect_prefix(cfg, set(sd))
        fused = any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
        rules = get_family(cfg.model_type).rules(cfg, prefix, fused)
    missing = [n for _, hf, _, _ in rules for n in hf if n not in sd]
    if get_family(cfg.model_type).encoder:  # a checkpoint without the pooler still gives embeddings
        missing = [n for n in missing if "pooler" not in n]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s) the config needs: "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    used = {n for _, hf, _, _ in rules for n in hf}
    unexpected = [n for n in sd if n not in used and not _ignorable(n, cfg)]
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensor(s) the config does not use: "
                              f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    out = {}
    for ours, hf, op, _ in rules:
        if not all(n in sd for n in hf):
            continue
        try:
            t = _combine([sd[n] for n in hf], op)
        except RuntimeError as e:
            raise CheckpointError(f"tensors {hf} cannot be combined into {ours!r}: {e}") from None
        if t.shape != expected[ours]:
            raise CheckpointError(f"tensor {hf[0] if len(hf) == 1 else hf} has shape {tuple(t.shape)} "
                                  f"but the config expects {tuple(expected[ours])} for {ours!r}")
        out[ours] = t
    return out


def llmkit_to_hf(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg = model.config
    sd = model.state_dict()
    if cfg.model_type == "llmkit":
        return {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    fam = get_family(cfg.model_type)
    out = {}
    for ours, hf, op, sizes in fam.rules(cfg, fam.save_prefix, False):
        for name, t in zip(hf, _split(sd[ours], op, sizes)):
            out[name] = t
    return out


# ---------------------------------------------------------------------------- files


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; expected a model folder with config.json and *.safetensors")
        return p
    if str(path).count("/") == 1 and not str(path).startswith((".", "/")):  # looks like a hub id
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.model"]))
        except Exception as e:  # offline, unknown repo, ...
            raise CheckpointError(f"{path!r} is not a local folder and could not be downloaded "
                                  f"from the Hugging Face hub: {e}") from None
    raise CheckpointError(f"model folder {p} does not exist")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    p = _resolve(path) / "config.json"
    if not p.exists():
        raise CheckpointError(f"no config.json in {p.parent}; expected a Hugging Face model folder")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a folder: sharded or single safetensors, else pytorch_model*.bin (weights only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = _resolve(path)
    index = p / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in p.glob("*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not (p / f).exists():
            raise CheckpointError(f"shard {f} listed in {index.name} is missing from {p}")
        try:
            sd.update(load_file(p / f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {p / f} (truncated or corrupt safetensors file?): {e}") from None
    if files:
        return sd
    bins = sorted(p.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"no *.safetensors or pytorch_model*.bin weights in {p}")
    for f in bins:
        try:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise CheckpointError(f"cannot read {f} as a PyTorch weights file: {e}") from None
    return sd


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    adapter: str | os.PathLike | None = None,
):
    """Load a Hugging Face model folder (or hub id) as an llmkit model in eval mode.

    dtype defaults to float32 on CPU and to the checkpoint's dtype on an accelerator. A folder written
    for a quantized model loads quantized; `quantize="int8"` (per channel) or `"int4"` (group 64)
    quantizes a float one on the fly (RTN).
    `adapter`: a PEFT adapter folder (LoRA or prompt tuning) applied on top of the base weights.
    """
    model = _load_model(path, dtype, device)
    if quantize:
        if getattr(model, "quantization", None) or not hasattr(model, "quantize"):
            raise ConfigError(f"--quantize {quantize}: {path} is already quantized or not a decoder")
        if quantize not in ("int8", "int4"):
            raise ConfigError(f"quantize must be 'int8' or 'int4', got {quantize!r}")
        model.quantize(quantize, group_size=0 if quantize == "int8" else 64)
    if adapter is not None:
        from llmkit.model.adapters import load_adapter  # adapters build on this module's loader

        name = getattr(model, "name_or_path", None)
        model = load_adapter(model, adapter).eval()
        model.name_or_path = name
    return model


def _load_model(path, dtype, device):
    p = _resolve(path)
    d = read_config(p)
    if "model_type" not in d:
        raise CheckpointError(f"{p / 'config.json'} has no model_type")
    quantization = d.pop("quantization", None)
    lowrank = d.pop("lowrank", None)
    cfg = config_from_hf(d)
    device = torch.device(device or "cpu")
    if quantization is not None or lowrank is not None:
        return _load_quantized(p, cfg, quantization, device, lowrank)
    if dtype is None:
        name = d.get("dtype") or d.get("torch_dtype") or "float32"
        dtype = getattr(torch, name, torch.float32) if device.type != "cpu" else torch.float32
    with torch.device("meta"):
        fam = get_family(cfg.model_type)
        model = MODEL_CLASSES["encoder" if fam.encoder else "seq2seq" if fam.seq2seq else "decoder"](cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = hf_to_llmkit(read_state_dict(p), cfg, expected)
    encoder = get_family(cfg.model_type).encoder
    if encoder and "pooler.weight" not in sd:  # embeddings-only checkpoints
        sd["pooler.weight"] = torch.zeros(expected["pooler.weight"])
        sd["pooler.bias"] = torch.zeros(expected["pooler.bias"])
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
        if not encoder:
            sd["lm_head.weight"] = sd["wte.weight"]
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings and not encoder:
        model.lm_head.weight = model.wte.weight
    model.init_buffers(device)
    model.name_or_path = str(p)
    return model.eval()


def _load_quantized(p: Path, cfg: ModelConfig, quantization: dict[str, Any] | None, device: torch.device,
                    lowrank: dict[str, Any] | None = None):
    """A folder `save_pretrained` wrote for a quantized or low-rank model: llmkit tensor names, its kinds."""
    if quantization is not None and device.type != "cpu":
        raise ConfigError(f"quantized models run on the CPU kernels; got device {device}")
    if quantization is not None and (not isinstance(quantization, dict)
                                     or not isinstance(quantization.get("modules"), dict)):
        raise CheckpointError(f"{p / 'config.json'}: 'quantization' must be an object with a 'modules' map")
    with torch.device("meta"):
        model = MODEL_CLASSES["decoder"](cfg)
    if lowrank is not None:
        build_lowrank(model, lowrank)
    if quantization is not None:
        build_quantized(model, quantization)
    sd = read_state_dict(p)
    for k, v in sd.items():  # the int8 kernels' vector loads need 64-byte alignment; safetensors gives 8
        if v.data_ptr() % 64:
            sd[k] = v.clone()
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["wte.weight"]
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{p}: tensors do not match the model kinds in config.json: {e}") from None
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.init_buffers(device)
    model.name_or_path = str(p)
    return model.eval()



def _is_weights_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) or name in ("model.safetensors.index.json", "config.json")


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike, max_shard_size: int = 5 * 2**30,
                    prefix: str = "", extra: dict[str, torch.Tensor] | None = None,
                    architecture: str | None = None) -> None:
    """Write `model` as a Hugging Face folder: config.json, generation_config.json, safetensors shards.

    `prefix` goes before every tensor name and `extra` (already Hugging Face names, e.g. a head) is added;
    `architecture` overrides config.json's `architectures` (e.g. `BertForMaskedLM`)."""
    from safetensors.torch import save_file

    cfg = model.config
    hf_cfg = config_to_hf(cfg)
    quantization = getattr(model, "quantization", None)
    lowrank = getattr(model, "lowrank", None)
    if quantization or lowrank:  # llmkit's own tensor names: these kinds have no Hugging Face equivalent
        sd = model.state_dict()
        if cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        if quantization:
            hf_cfg["quantization"] = quantization
        if lowrank:
            hf_cfg["lowrank"] = lowrank
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    else:
        tensors = {prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in llmkit_to_hf(model).items()}
    tensors.update({k: v.detach().to("cpu").contiguous().clone() for k, v in (extra or {}).items()})
    if architecture:
        hf_cfg["architectures"] = [architecture]
    dtype = next(v.dtype for v in tensors.values() if v.is_floating_point())
    hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        if not get_family(cfg.model_type).encoder:
            keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
            gen = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    write_dir(Path(path), write, carry_over=lambda name: not _is_weights_file(name))
