"""llmkit: the whole LLM lifecycle in one readable package.

The public Python API; heavy modules are imported lazily so `import llmkit` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "ModelConfig": "llmkit.model.config",
    "Transformer": "llmkit.model.transformer",
    "BertModel": "llmkit.model.bert",
    "load_model": "llmkit.model.hf",
    "load_tokenizer": "llmkit.tokenizer",
    "Tokenizer": "llmkit.tokenizer",
    "embed": "llmkit.model.embed",
    "load_llama2c": "llmkit.model.llama2c",
    "generate": "llmkit.infer.generate",
    "generate_text": "llmkit.infer.generate",
    "SamplingParams": "llmkit.infer.sampling",
    "finetune": "llmkit.train.finetune",
    "LlmkitError": "llmkit.errors",
    "prune_model": "llmkit.model.prune",
    "lowrank_model": "llmkit.model.lowrank",
    "merge_lowrank": "llmkit.model.lowrank",
    "distill": "llmkit.train.distill",
    "compress_report": "llmkit.eval.compress_report",
}

# subpackages reachable as attributes (`@llmkit.agent.tool` after `import llmkit`)
_SUBPACKAGES = {"agent"}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"llmkit.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmkit' has no attribute {name!r}")
