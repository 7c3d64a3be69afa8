"""Model code: config, decoder Transformer (dense and MoE), BERT encoder, Hugging Face interop."""

from llmkit.model.bert import BertModel
from llmkit.model.config import ModelConfig
from llmkit.model.hf import load_model, save_pretrained
from llmkit.model.transformer import Transformer  # importing the model classes registers them with hf

__all__ = ["BertModel", "ModelConfig", "Transformer", "load_model", "save_pretrained"]
