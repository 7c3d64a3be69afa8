"""ONNX export of a decoder with KV-cache inputs/outputs, and `OrtModel`: the exported graph behind the
same call the generation loop makes on an llmkit model.

Graph inputs: input_ids [B, T], attention_mask [B, P+T] (1 = token), position_ids [B, T],
past_key_values.{i}.key / .value [B, Hkv, P, D]; outputs: logits [B, T, V], present.{i}.key / .value
[B, Hkv, P+T, D]. Batch, sequence and past lengths are dynamic axes (the names optimum uses).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmkit.errors import CheckpointError, ConfigError
from llmkit.fsutil import write_dir
from llmkit.model.attention import AttnMeta
from llmkit.model.config import ModelConfig
from llmkit.model.hf import load_model
from llmkit.model.transformer import Transformer

ONNX_FILE = "model.onnx"


class _ConcatCache:
    """The model's `update(layer, k, v)` hook for export: past ++ new, kept as the graph's present."""

    def __init__(self, past: list[tuple[Tensor, Tensor]], n_rep: int):
        self.past, self.present, self.n_rep = past, [], n_rep

    def update(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        pk, pv = self.past[i]
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        self.present.append((k, v))
        if self.n_rep > 1:  # grouped-query attention as plain attention (the exporter has no enable_gqa)
            k, v = k.repeat_interleave(self.n_rep, 1), v.repeat_interleave(self.n_rep, 1)
        return k, v

    def get_seq_length(self) -> int:
        return self.past[0][0].shape[2]


class _GraphMeta(AttnMeta):
    """Masks computed inside the graph from tensors (so every length stays a dynamic axis)."""

    def mask(self, window: int | None, explicit: bool = False) -> Tensor:
        return self._masks[window]


class _Decoder(torch.nn.Module):
    """Flat-tensor wrapper: builds the causal/padding/window masks from tensors only (traceable)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.windows = sorted({b.attn.window for b in model.blocks}, key=lambda w: -1 if w is None else w)

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        ones_q = torch.ones_like(input_ids[0])  # [T]
        ones_k = torch.ones_like(attention_mask[0])  # [S]
        k_col = ones_k.cumsum(0) - 1  # [S] key columns
        q_col = ones_q.cumsum(0) - 1 + (ones_k.sum() - ones_q.sum())  # [T] query columns: past + t
        causal = k_col[None, :] <= q_col[:, None]  # [T, S]
        pad = attention_mask[:, None, None, :].bool()  # [B, 1, 1, S]
        diag = (k_col[None, :] == q_col[:, None])[None, None]
        masks = {}
        for w in self.windows:
            m = causal if w is None else causal & (q_col[:, None] - k_col[None, :] < w)
            masks[w] = (m[None, None] & pad) | diag  # [B, 1, T, S]
        cfg = self.model.config
        cache = _ConcatCache(past, cfg.n_head // cfg.n_kv_head)
        meta = _GraphMeta(position_ids, 0, q_cols=q_col[None], key_mask=attention_mask, _masks=masks)
        logits = self.model(input_ids, position_ids=position_ids, kv_cache=cache, attn_meta=meta)
        return (logits, *[t for kv in cache.present for t in kv])


def _io_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike, quantize: str | None = None,
                opset: int = 17) -> Path:
    """Export a float decoder folder to `out` (model.onnx + config.json + tokenizer); `quantize="int8"`
    then rewrites the graph with ONNX Runtime's dynamic int8 quantization (MatMul weights int8)."""
    src = Path(model_dir)
    model = load_model(src)
    if not isinstance(model, Transformer) or getattr(model, "quantization", None):
        raise ConfigError("ONNX export takes a float decoder folder (quantize the graph with --quantize int8)")
    if model.config.rope_type == "dynamic" or model.config.pos == "alibi":
        raise ConfigError("ONNX export does not cover dynamic RoPE scaling or ALiBi")
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize must be int8, got {quantize!r}")
    cfg = model.config
    model.check_inputs = False  # range checks are host syncs; the graph has no data-dependent branches
    dec = _Decoder(model).eval()
    B, T, P = 2, 3, 4
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    mask = torch.ones(B, P + T, dtype=torch.long)
    pos = torch.arange(P, P + T).expand(B, T).contiguous()
    past = [torch.zeros(B, cfg.n_kv_head, P, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    inputs, outputs = _io_names(cfg.n_layer)
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                                       "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in inputs[3:]})
    axes.update({n: {0: "batch", 2: "total"} for n in outputs[1:]})
    out = Path(out)

    def write(tmp: Path) -> None:
        with torch.no_grad():
            torch.onnx.export(dec, (ids, mask, pos, *past), str(tmp / ONNX_FILE), input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, opset_version=opset, dynamo=False)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(tmp / ONNX_FILE), str(tmp / "model.int8.onnx"), weight_type=QuantType.QInt8)
            os.replace(tmp / "model.int8.onnx", tmp / ONNX_FILE)
        conf = json.loads((src / "config.json").read_text())
        conf["onnx"] = {"file": ONNX_FILE, "opset": opset, "quantize": quantize, "config": cfg.to_dict()}
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        for f in src.iterdir():  # tokenizer, chat template, generation config
            if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("generation_config.json",
                                                                          "special_tokens_map.json")):
                shutil.copy2(f, tmp / f.name)

    write_dir(out, write)
    return out


class OrtModel(torch.nn.Module):
    """An exported decoder run by ONNX Runtime, called like an llmkit model by the generation loop:
    `model(ids, kv_cache=StaticKVCache, attn_meta=..., num_logits_to_keep=1)`.

    It reads the past from the cache, runs the graph and writes the new keys/values back with
    `cache.update`, so the one generation loop (sampling, stops, streaming) drives it unchanged.
    """

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        super().__init__()
        folder = Path(folder)
        conf_path = folder / "config.json"
        if not conf_path.is_file() or "onnx" not in json.loads(conf_path.read_text()):
            raise CheckpointError(f"{folder} is not an ONNX export (make one with `llmkit export onnx`)")
        meta = json.loads(conf_path.read_text())["onnx"]
        self.config = ModelConfig.from_dict(meta["config"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(folder / meta["file"]), opts, providers=["CPUExecutionProvider"])
        self.inputs, self.outputs = _io_names(self.config.n_layer)
        self.name_or_path = str(folder)
        # no weights here; this empty parameter tells the loop the KV cache's dtype and device
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                kv_cache: Any = None, num_logits_to_keep: int = 0, attn_meta: AttnMeta | None = None) -> Tensor:
        B, T = input_ids.shape
        P = kv_cache.get_seq_length() if kv_cache is not None else 0
        if attn_meta is not None:
            position_ids, attention_mask = attn_meta.position_ids, attn_meta.key_mask
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(P, P + T).expand(B, T)
        feed = {"input_ids": input_ids.numpy().astype(np.int64),
                "attention_mask": attention_mask.numpy().astype(np.int64),
                "position_ids": np.ascontiguousarray(position_ids.numpy().astype(np.int64))}
        cfg = self.config
        for i in range(cfg.n_layer):
            if kv_cache is not None:
                k, v = kv_cache.k[i][:, :, :P], kv_cache.v[i][:, :, :P]
            else:
                k = v = torch.zeros(B, cfg.n_kv_head, 0, cfg.head_dim)
            feed[f"past_key_values.{i}.key"] = np.ascontiguousarray(k.numpy())
            feed[f"past_key_values.{i}.value"] = np.ascontiguousarray(v.numpy())
        res = self.session.run(None, feed)
        if kv_cache is not None:
            for i in range(cfg.n_layer):
                k, v = res[1 + 2 * i], res[2 + 2 * i]
                kv_cache.update(i, torch.from_numpy(k[:, :, P:]), torch.from_numpy(v[:, :, P:]))
        logits = torch.from_numpy(res[0])
        return logits[:, -num_logits_to_keep:] if num_logits_to_keep else logits
