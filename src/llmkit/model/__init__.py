"""Model code: config, decoder Transformer (dense and MoE), BERT encoder, Hugging Face interop."""

from llmkit.model.config import ModelConfig
from llmkit.model.hf import load_model, save_pretrained

__all__ = ["ModelConfig", "load_model", "save_pretrained"]
