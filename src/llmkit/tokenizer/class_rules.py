"""transformers >= 5 rebuilds the pipeline of some tokenizer classes from tokenizer_config.json,
ignoring parts of tokenizer.json. These rules do the same, so ids stay equal to AutoTokenizer's."""

from __future__ import annotations

import base64
import json
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, normalizers, pre_tokenizers


def _is_byte_level(tok_json: dict[str, Any]) -> bool:
    return "ByteLevel" in json.dumps([tok_json.get("pre_tokenizer"), tok_json.get("decoder")])


def _apply_llama_rules(backend: _HFTokenizer, config: dict[str, Any]) -> None:
    """What transformers >= 5 does to a SentencePiece-style folder whose tokenizer_class is LlamaTokenizer.

    It ignores the file's normalizer (Prepend + Replace in Llama 2 files) and splits with Metaspace:
    a space is prepended to the first piece only (`legacy: false`, the default), to every piece
    (`legacy: true`) or never (`add_prefix_space: false`).
    """
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    if not add_prefix_space:
        scheme = "never"
    else:
        scheme = "always" if config.get("legacy", False) else "first"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)


def _apply_gpt2_rules(backend: _HFTokenizer, config: dict[str, Any]) -> None:
    """What transformers >= 5 does for `GPT2Tokenizer`: no normalizer, ByteLevel with the config's
    `add_prefix_space` (default false)."""
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    backend.decoder = decoders.ByteLevel()


def _apply_t5_rules(backend: _HFTokenizer, tok_json: dict[str, Any]) -> None:
    """What transformers >= 5 does for `T5Tokenizer` (T5, mT5; SentencePiece Unigram): keep only a
    Precompiled normalizer (the SentencePiece charsmap), split on whitespace, then Metaspace with a
    space prepended to every word; decode with Metaspace."""
    norm = tok_json.get("normalizer") or {}
    parts = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    charsmap = next((n for n in parts if n.get("type") == "Precompiled" and "precompiled_charsmap" in n), None)
    backend.normalizer = (normalizers.Precompiled(base64.b64decode(charsmap["precompiled_charsmap"]))
                          if charsmap else None)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)


def _apply_gemma_rules(backend: _HFTokenizer) -> None:
    """What transformers >= 5 does for `GemmaTokenizer` (byte-fallback BPE): spaces become "▁" in the
    normalizer, pieces split after each space, no prefix space; decode by replacing "▁" back."""
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])


def apply_class_rules(backend: _HFTokenizer, config: dict[str, Any], tok_json: dict[str, Any]) -> None:
    """transformers >= 5 rebuilds the pipeline of some tokenizer classes from the config, ignoring
    parts of tokenizer.json; mirror the common ones so ids stay equal to AutoTokenizer's."""
    cls = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    model_type = (tok_json.get("model") or {}).get("type")
    if cls == "LlamaTokenizer" and not _is_byte_level(tok_json):
        _apply_llama_rules(backend, config)
    elif cls == "GPT2Tokenizer" and model_type == "BPE" and _is_byte_level(tok_json):
        _apply_gpt2_rules(backend, config)
    elif cls == "GemmaTokenizer" and model_type == "BPE":
        _apply_gemma_rules(backend)
    elif cls == "T5Tokenizer" and model_type == "Unigram":
        _apply_t5_rules(backend, tok_json)
