"""Hugging Face model folders in and out: config.json mapping, tensor-name maps, safetensors I/O.

`load_model(path)` reads config.json + (sharded) safetensors or a PyTorch .bin and returns an llmkit
model in eval mode; `save_pretrained(model, path)` writes a folder `transformers` loads unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import CheckpointError, ConfigError
from llmkit.fsutil import replace_dir
from llmkit.model.config import ModelConfig

ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel",
                 "llmkit": "LlmkitForCausalLM"}
_LLAMA_LIKE = ("llama", "qwen2", "mistral", "mixtral")

# ---------------------------------------------------------------------------- config.json


def _act(name: str) -> str:
    if name not in ACT_FROM_HF:
        raise ConfigError(f"unsupported activation {name!r}; supported: {', '.join(ACT_FROM_HF)}")
    return ACT_FROM_HF[name]


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face config.json dict into a ModelConfig."""
    mt = d.get("model_type")
    if mt == "llmkit":
        return ModelConfig.from_dict({k: v for k, v in d.items() if k not in ("architectures", "torch_dtype")})
    common = dict(model_type=mt, vocab_size=d["vocab_size"], bos_token_id=d.get("bos_token_id"),
                  eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"), extra=dict(d))
    if mt in _LLAMA_LIKE:
        rp = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        bias = d.get("attention_bias", False)
        window = d.get("sliding_window")
        if mt == "qwen2" and not d.get("use_sliding_window", False):
            window = None
        layer_types = d.get("layer_types") if window is not None else None
        return ModelConfig(
            **common, n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
            n_kv_head=d.get("num_key_value_heads") or d["num_attention_heads"], n_embd=d["hidden_size"],
            head_dim=d.get("head_dim"), intermediate_size=d["intermediate_size"],
            block_size=d.get("max_position_embeddings", 2048), norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6),
            mlp="swiglu", activation=_act(d.get("hidden_act", "silu")), pos="rope",
            rope_theta=d.get("rope_theta", rp.get("rope_theta", 10000.0)), rope_scaling=scaling,
            sliding_window=window, layer_types=layer_types, qkv_bias=bias or mt == "qwen2",
            attn_out_bias=bias, mlp_bias=d.get("mlp_bias", False),
            tie_embeddings=d.get("tie_word_embeddings", False),
            n_expert=d.get("num_local_experts", 0) if mt == "mixtral" else 0,
            n_expert_per_tok=d.get("num_experts_per_tok", 2),
            router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
        )
    if mt == "gpt2":
        return ModelConfig(
            **common, n_layer=d["n_layer"], n_head=d["n_head"], n_embd=d["n_embd"],
            intermediate_size=d.get("n_inner"), block_size=d.get("n_positions", 1024), norm="layernorm",
            norm_eps=d.get("layer_norm_epsilon", 1e-5), mlp="gelu",
            activation=_act(d.get("activation_function", "gelu_new")), pos="learned",
            qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=d.get("tie_word_embeddings", True),
        )
    if mt == "bert":
        return ModelConfig(
            **common, n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"], n_embd=d["hidden_size"],
            intermediate_size=d["intermediate_size"], block_size=d.get("max_position_embeddings", 512),
            norm="layernorm", norm_eps=d.get("layer_norm_eps", 1e-12), mlp="gelu",
            activation=_act(d.get("hidden_act", "gelu")), pos="learned", qkv_bias=True,
            type_vocab_size=d.get("type_vocab_size", 2),
        )
    raise ConfigError(f"unsupported model_type {mt!r} in config.json; llmkit loads: "
                      "llama, qwen2, mistral, mixtral, gpt2, bert, llmkit")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json dict `transformers` expects for `cfg` (unmapped keys of a loaded model kept)."""
    mt = cfg.model_type
    d: dict[str, Any] = {k: v for k, v in cfg.extra.items() if k not in ("transformers_version",)}
    d.update(model_type=mt, architectures=[ARCHITECTURES[mt]], vocab_size=cfg.vocab_size, torch_dtype="float32",
             bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    if mt == "llmkit":
        d.update({k: v for k, v in cfg.to_dict().items() if k != "extra"})
        return d
    if mt in _LLAMA_LIKE:
        if cfg.pos != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu":
            raise ConfigError(f"model_type {mt!r} needs pos=rope, norm=rmsnorm, mlp=swiglu; use model_type 'llmkit'")
        rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
        d.update(hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
                 num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                 hidden_act=ACT_TO_HF[cfg.activation], max_position_embeddings=cfg.block_size,
                 rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                 rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout)
        if mt == "llama":
            d.update(attention_bias=cfg.attn_out_bias, mlp_bias=cfg.mlp_bias)
        if mt in ("mistral", "mixtral"):
            d.update(sliding_window=cfg.sliding_window)
        if mt == "qwen2":
            d.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
            if cfg.layer_types is not None:
                d.update(layer_types=cfg.layer_types)
        if mt == "mixtral":
            d.update(num_local_experts=cfg.n_expert, num_experts_per_tok=cfg.n_expert_per_tok,
                     router_aux_loss_coef=cfg.router_aux_loss_coef)
        return d
    if mt in ("gpt2", "bert") and not cfg.norm_bias:
        raise ConfigError(f"model_type {mt!r} has LayerNorm biases; use model_type 'llmkit' for norm_bias=False")
    if mt == "gpt2":
        d.update(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_positions=cfg.block_size,
                 n_inner=cfg.intermediate_size, activation_function=ACT_TO_HF[cfg.activation],
                 layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                 resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
        return d
    if mt == "bert":
        d.update(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                 intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.block_size,
                 layer_norm_eps=cfg.norm_eps, hidden_act=ACT_TO_HF[cfg.activation],
                 type_vocab_size=cfg.type_vocab_size, hidden_dropout_prob=cfg.dropout,
                 attention_probs_dropout_prob=cfg.dropout)
        return d
    raise ConfigError(f"cannot export model_type {mt!r}")


# ---------------------------------------------------------------------------- tensor names
# A rule maps one llmkit tensor to Hugging Face tensors: (ours, [hf names], op, split sizes).
# ops: "id" copy; "cat" concatenate on dim 0; "t" transpose (GPT-2 Conv1D);
#      "stack" stack experts; "stack_cat" stack experts, each the concatenation of a pair.
Rule = tuple[str, list[str], str, list[int]]


def _rules(cfg: ModelConfig, prefix: str = "", fused_experts: bool = False) -> list[Rule]:
    mt, p = cfg.model_type, prefix
    R: list[Rule] = []

    def add(ours: str, hf: str | list[str], op: str = "id", sizes: list[int] | None = None) -> None:
        R.append((ours, [hf] if isinstance(hf, str) else hf, op, sizes or []))

    if mt in _LLAMA_LIKE:
        hd, nh, nkv, inter = cfg.head_dim, cfg.n_head, cfg.n_kv_head, cfg.intermediate_size
        add("wte.weight", f"{p}embed_tokens.weight")
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"{p}layers.{i}."
            add(b + "ln_1.weight", h + "input_layernorm.weight")
            add(b + "ln_2.weight", h + "post_attention_layernorm.weight")
            qkv = [h + f"self_attn.{n}_proj" for n in "qkv"]
            sizes = [nh * hd, nkv * hd, nkv * hd]
            add(b + "attn.qkv.weight", [n + ".weight" for n in qkv], "cat", sizes)
            if cfg.qkv_bias:
                add(b + "attn.qkv.bias", [n + ".bias" for n in qkv], "cat", sizes)
            add(b + "attn.proj.weight", h + "self_attn.o_proj.weight")
            if cfg.attn_out_bias:
                add(b + "attn.proj.bias", h + "self_attn.o_proj.bias")
            if cfg.n_expert and fused_experts:  # transformers 5 in-memory layout
                add(b + "mlp.router.weight", h + "mlp.gate.weight")
                add(b + "mlp.w_fc", h + "mlp.experts.gate_up_proj")
                add(b + "mlp.w_proj", h + "mlp.experts.down_proj")
            elif cfg.n_expert:  # the published Mixtral layout
                m = h + "block_sparse_moe."
                add(b + "mlp.router.weight", m + "gate.weight")
                pairs = [m + f"experts.{e}.{w}.weight" for e in range(cfg.n_expert) for w in ("w1", "w3")]
                add(b + "mlp.w_fc", pairs, "stack_cat", [inter, inter])
                add(b + "mlp.w_proj", [m + f"experts.{e}.w2.weight" for e in range(cfg.n_expert)], "stack")
            else:
                gu = [h + "mlp.gate_proj", h + "mlp.up_proj"]
                add(b + "mlp.fc.weight", [n + ".weight" for n in gu], "cat", [inter, inter])
                if cfg.mlp_bias:
                    add(b + "mlp.fc.bias", [n + ".bias" for n in gu], "cat", [inter, inter])
                add(b + "mlp.proj.weight", h + "mlp.down_proj.weight")
                if cfg.mlp_bias:
                    add(b + "mlp.proj.bias", h + "mlp.down_proj.bias")
        add("ln_f.weight", f"{p}norm.weight")
    elif mt == "gpt2":
        add("wte.weight", f"{p}wte.weight")
        add("wpe.weight", f"{p}wpe.weight")
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"{p}h.{i}."
            for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
                add(b + ours + ".weight", h + theirs + ".weight")
                add(b + ours + ".bias", h + theirs + ".bias")
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                add(b + ours + ".weight", h + theirs + ".weight", "t")
                add(b + ours + ".bias", h + theirs + ".bias")
        add("ln_f.weight", f"{p}ln_f.weight")
        add("ln_f.bias", f"{p}ln_f.bias")
    elif mt == "bert":
        e = f"{p}embeddings."
        add("wte.weight", e + "word_embeddings.weight")
        add("wpe.weight", e + "position_embeddings.weight")
        add("wtt.weight", e + "token_type_embeddings.weight")
        add("ln_emb.weight", e + "LayerNorm.weight")
        add("ln_emb.bias", e + "LayerNorm.bias")
        for i in range(cfg.n_layer):
            b, h = f"layers.{i}.", f"{p}encoder.layer.{i}."
            qkv = [h + f"attention.self.{n}" for n in ("query", "key", "value")]
            for t in ("weight", "bias"):
                add(b + "qkv." + t, [n + "." + t for n in qkv], "cat", [cfg.n_embd] * 3)
                add(b + "attn_out." + t, h + "attention.output.dense." + t)
                add(b + "ln_attn." + t, h + "attention.output.LayerNorm." + t)
                add(b + "fc." + t, h + "intermediate.dense." + t)
                add(b + "proj." + t, h + "output.dense." + t)
                add(b + "ln_mlp." + t, h + "output.LayerNorm." + t)
        for t in ("weight", "bias"):
            add("pooler." + t, f"{p}pooler.dense." + t)
    if mt != "bert" and not cfg.tie_embeddings:
        add("lm_head.weight", "lm_head.weight")
    return R


# tensors a checkpoint may carry that are not weights (buffers, heads we do not use)
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "position_ids")


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    if name.endswith(_IGNORABLE_SUFFIXES):
        return True
    if cfg.model_type == "bert" and name.split(".")[0] in ("cls", "lm_head", "classifier"):
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
    anchor = {"gpt2": "wte.weight", "bert": "embeddings.word_embeddings.weight"}.get(
        cfg.model_type, "embed_tokens.weight")
    for p in {"gpt2": ("transformer.", ""), "bert": ("", "bert.")}.get(cfg.model_type, ("model.", "")):
        if p + anchor in names:
            return p
    raise CheckpointError(f"no embedding tensor {anchor!r} (with or without a model prefix) in the checkpoint; "
                          f"is config.json's model_type {cfg.model_type!r} right?")


def hf_to_llmkit(sd: dict[str, torch.Tensor], cfg: ModelConfig, expected: dict[str, torch.Size]) -> dict:
    """Convert a Hugging Face state dict to llmkit names; errors name missing/unexpected/misshapen tensors."""
    if cfg.model_type == "llmkit":  # our own names; a tied head is not stored
        rules = [(k, [k], "id", []) for k in expected if not (cfg.tie_embeddings and k == "lm_head.weight")]
    else:
        prefix = _detect_prefix(cfg, set(sd))
        fused = any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
        rules = _rules(cfg, prefix, fused)
    missing = [n for _, hf, _, _ in rules for n in hf if n not in sd]
    if cfg.model_type == "bert":  # a checkpoint without the pooler still gives embeddings
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
    prefix = {"gpt2": "transformer.", "bert": ""}.get(cfg.model_type, "model.")
    out = {}
    for ours, hf, op, sizes in _rules(cfg, prefix):
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


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               quantize: str | None = None):
    """Load a Hugging Face model folder (or hub id) as an llmkit model in eval mode.

    dtype defaults to float32 on CPU and to the checkpoint's dtype on an accelerator. A folder written
    for a quantized model loads quantized; `quantize="int8"` (per channel) or `"int4"` (group 64)
    quantizes a float one on the fly (RTN).
    """
    model = _load_model(path, dtype, device)
    if quantize:
        if getattr(model, "quantization", None) or not hasattr(model, "quantize"):
            raise ConfigError(f"--quantize {quantize}: {path} is already quantized or not a decoder")
        if quantize not in ("int8", "int4"):
            raise ConfigError(f"quantize must be 'int8' or 'int4', got {quantize!r}")
        model.quantize(quantize, group_size=0 if quantize == "int8" else 64)
    return model


def _load_model(path, dtype, device):
    from llmkit.model.bert import BertModel
    from llmkit.model.transformer import Transformer

    p = _resolve(path)
    d = read_config(p)
    if "model_type" not in d:
        raise CheckpointError(f"{p / 'config.json'} has no model_type")
    quantization = d.pop("quantization", None)
    cfg = config_from_hf(d)
    device = torch.device(device or "cpu")
    if quantization is not None:
        return _load_quantized(p, cfg, quantization, device)
    if dtype is None:
        name = d.get("dtype") or d.get("torch_dtype") or "float32"
        dtype = getattr(torch, name, torch.float32) if device.type != "cpu" else torch.float32
    with torch.device("meta"):
        model = BertModel(cfg) if cfg.model_type == "bert" else Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = hf_to_llmkit(read_state_dict(p), cfg, expected)
    if cfg.model_type == "bert" and "pooler.weight" not in sd:  # embeddings-only checkpoints
        sd["pooler.weight"] = torch.zeros(expected["pooler.weight"])
        sd["pooler.bias"] = torch.zeros(expected["pooler.bias"])
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
        if cfg.model_type != "bert":
            sd["lm_head.weight"] = sd["wte.weight"]
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings and cfg.model_type != "bert":
        model.lm_head.weight = model.wte.weight
    model.init_buffers(device)
    model.name_or_path = str(p)
    return model.eval()


def _load_quantized(p: Path, cfg: ModelConfig, quantization: dict[str, Any], device: torch.device):
    """A folder `save_pretrained` wrote for a quantized model: llmkit tensor names, quantized kinds."""
    from llmkit.model.quant import build_quantized
    from llmkit.model.transformer import Transformer

    if device.type != "cpu":
        raise ConfigError(f"quantized models run on the CPU kernels; got device {device}")
    if not isinstance(quantization, dict) or not isinstance(quantization.get("modules"), dict):
        raise CheckpointError(f"{p / 'config.json'}: 'quantization' must be an object with a 'modules' map")
    with torch.device("meta"):
        model = Transformer(cfg)
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
        raise CheckpointError(f"{p}: tensors do not match the quantized model in config.json: {e}") from None
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.init_buffers(device)
    model.name_or_path = str(p)
    return model.eval()


def _atomic_dir_write(path: Path, write) -> None:
    """Write a folder via `write(tmp_dir)`, then swap it in; files we do not own are carried over."""
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists():  # keep tokenizer files, READMEs, training state...
            for f in path.iterdir():
                if not (tmp / f.name).exists() and not _is_weights_file(f.name):
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_weights_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) or name in ("model.safetensors.index.json", "config.json")


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike, max_shard_size: int = 5 * 2**30) -> None:
    """Write `model` as a Hugging Face folder: config.json, generation_config.json, safetensors shards."""
    from safetensors.torch import save_file

    cfg = model.config
    hf_cfg = config_to_hf(cfg)
    quantization = getattr(model, "quantization", None)
    if quantization:  # llmkit's own tensor names: quantized kinds have no Hugging Face equivalent
        sd = model.state_dict()
        if cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        hf_cfg["quantization"] = quantization
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    else:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in llmkit_to_hf(model).items()}
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
        if cfg.model_type != "bert":
            gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if getattr(cfg, k) is not None}
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

    _atomic_dir_write(Path(path), write)
