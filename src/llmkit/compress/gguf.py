"""`export_gguf`: a Llama-family llmkit model as one GGUF file llama.cpp runs (written with the `gguf` package).

Weights go out as f32, f16, q8_0 or q4_0 (llama.cpp's block formats, 32 weights a block; rows whose length
is not a multiple of 32 stay f16/f32). q and k rows are permuted to llama.cpp's interleaved RoPE pairs.
The tokenizer travels in the metadata: byte-level BPE as `gpt2` (tokens, types, merges, pre-tokenizer),
a character/word-level or SentencePiece-style vocabulary as `llama` (tokens, scores, types), plus the
special-token ids and the chat template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from llmkit.errors import ConfigError, InputError
from llmkit.fsutil import atomic_path
from llmkit.model.hf import load_model
from llmkit.tokenizer import load_tokenizer
from llmkit.tokenizer.train import SPLIT_PATTERN

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved pairs (the inverse of llama2c's unpermute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_exportable(model) -> None:
    cfg = model.config
    problems = []
    if getattr(model, "quantization", None):
        problems.append("it is already quantized (export the float folder; --type q8_0/q4_0 quantizes)")
    if cfg.pos != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or cfg.activation != "silu":
        problems.append("GGUF export covers the Llama block (rope, rmsnorm, swiglu, silu)")
    if cfg.sliding_window is not None:
        problems.append("sliding-window attention has no llama.cpp 'llama' equivalent")
    if cfg.rope_type not in ("default", "linear"):
        problems.append(f"rope scaling {cfg.rope_type!r} is not exported (default and linear are)")
    if problems:
        raise ConfigError(f"cannot export this model to GGUF: {'; '.join(problems)}")


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, qtype: str = "f32") -> Path:
    """Write `model_dir` (a float model folder with tokenizer.json) as the GGUF file `out`."""
    import gguf

    if qtype not in GGUF_TYPES:
        raise ConfigError(f"--type must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}")
    model = load_model(model_dir)
    check_exportable(model)
    cfg = model.config
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(Path(model_dir).resolve().name)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        if cfg.rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
        if cfg.n_expert:
            w.add_expert_count(cfg.n_expert)
            w.add_expert_used_count(cfg.n_expert_per_tok)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, Path(model_dir), cfg)
        for name, t in _tensors(model):
            _add_tensor(w, name, t, qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def _tensors(model):
    """(GGUF name, float32 array) in llama.cpp's naming."""
    cfg = model.config
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    a = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    yield "token_embd.weight", a(model.wte.weight)
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", a(b.ln_1.weight)
        qkv = a(b.attn.qkv.weight)
        q, k, v = qkv[: H * D], qkv[H * D : (H + Hkv) * D], qkv[(H + Hkv) * D :]
        yield p + "attn_q.weight", _permute(q, H)
        yield p + "attn_k.weight", _permute(k, Hkv)
        yield p + "attn_v.weight", v
        if b.attn.qkv.bias is not None:
            qb = a(b.attn.qkv.bias)
            yield p + "attn_q.bias", _permute(qb[: H * D], H)
            yield p + "attn_k.bias", _permute(qb[H * D : (H + Hkv) * D], Hkv)
            yield p + "attn_v.bias", qb[(H + Hkv) * D :]
        yield p + "attn_output.weight", a(b.attn.proj.weight)
        if b.attn.proj.bias is not None:
            yield p + "attn_output.bias", a(b.attn.proj.bias)
        yield p + "ffn_norm.weight", a(b.ln_2.weight)
        if cfg.n_expert:
            I = cfg.intermediate_size  # noqa: E741
            yield p + "ffn_gate_inp.weight", a(b.mlp.router.weight)
            w_fc = a(b.mlp.w_fc)  # [E, 2I, C]
            yield p + "ffn_gate_exps.weight", np.ascontiguousarray(w_fc[:, :I])
            yield p + "ffn_up_exps.weight", np.ascontiguousarray(w_fc[:, I:])
            yield p + "ffn_down_exps.weight", a(b.mlp.w_proj)
        else:
            fc = a(b.mlp.fc.weight)
            gate, up = np.split(fc, 2, axis=0)
            yield p + "ffn_gate.weight", gate
            yield p + "ffn_up.weight", up
            yield p + "ffn_down.weight", a(b.mlp.proj.weight)
            if b.mlp.fc.bias is not None:
                raise ConfigError("GGUF export: MLP biases are not supported")
    yield "output_norm.weight", a(model.ln_f.weight)
    if not cfg.tie_embeddings:
        yield "output.weight", a(model.lm_head.weight)


def _add_tensor(w, name: str, t: np.ndarray, qtype: str) -> None:
    import gguf

    t = np.ascontiguousarray(t, dtype=np.float32)
    if t.ndim == 1 or qtype == "f32" or name.endswith("ffn_gate_inp.weight"):
        w.add_tensor(name, t)
        return
    kind = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(qtype)
    if kind is None or t.shape[-1] % 32:  # f16, or rows the 32-wide blocks do not fit
        w.add_tensor(name, t.astype(np.float16))
        return
    w.add_tensor(name, gguf.quants.quantize(t, kind), raw_dtype=kind)


# ---------------------------------------------------------------------------- tokenizer metadata


def _add_tokenizer(w, folder: Path, cfg) -> None:
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{folder} has no tokenizer.json; GGUF files carry their tokenizer")
    tok = load_tokenizer(folder)
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec["model"]
    vocab = tok.get_vocab()
    n = cfg.vocab_size
    if len(vocab) > n:
        raise ConfigError(f"the tokenizer has {len(vocab)} tokens but the model only {n} embeddings")
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for s, i in vocab.items():
        tokens[i] = s
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    byte_level = model["type"] == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if byte_level:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2" if SPLIT_PATTERN in json.dumps(spec.get("pre_tokenizer")) else "default")
        merges = model.get("merges", [])
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    else:  # SentencePiece-style: spaces are "▁", one score per token (longer pieces first)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        unk = model.get("unk_token")
        for s, i in vocab.items():
            if s == unk:
                types[i] = gguf.TokenType.UNKNOWN
                w.add_unk_token_id(i)
            elif i not in special:
                tokens[i] = s.replace(" ", "\u2581")
        w.add_token_scores([float(-i) for i in range(n)])
        w.add_add_space_prefix(False)
    w.add_token_list(tokens)
    w.add_token_types(types)
    probe = tok.encode("a", add_special_tokens=True)
    adds_bos = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
    w.add_add_bos_token(adds_bos)
    w.add_add_eos_token(False)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    eos = tok.eos_token_id if tok.eos_token_id is not None else (cfg.eos_token_ids or [None])[0]
    if eos is not None:
        w.add_eos_token_id(eos)
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def load_gguf_tensor(path: str | os.PathLike, name: str) -> torch.Tensor:
    """One tensor of a GGUF file, dequantized to float32 (reads with the `gguf` package)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    for t in r.tensors:
        if t.name == name:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
            return torch.from_numpy(np.array(arr, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)]))
    raise InputError(f"no tensor {name!r} in {path}")
