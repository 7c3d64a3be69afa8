"""Model code: config, decoder Transformer (dense and MoE), BERT encoder, T5 encoder-decoder, Hugging Face interop."""

from llmkit.model.bert import BertModel
from llmkit.model.config import ModelConfig
from llmkit.model.hf import load_model, save_pretrained
from llmkit.model.t5 import T5Model
from llmkit.model.transformer import Transformer  # importing the model classes registers them with hf

__all__ = ["BertModel", "ModelConfig", "T5Model", "Transformer", "load_model", "save_pretrained"]
