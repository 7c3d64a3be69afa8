"""llmkit.tokenizer: load Hugging Face tokenizer folders, train BPE / char tokenizers, chat templates."""

from llmkit.tokenizer.chat_template import CHATML_TEMPLATE, render_chat_template
from llmkit.tokenizer.tokenizer import Tokenizer, load_tokenizer
from llmkit.tokenizer.train import (
    train_bpe,
    train_bpe_from_iterator,
    train_char,
    train_char_from_iterator,
)

__all__ = [
    "CHATML_TEMPLATE",
    "Tokenizer",
    "load_tokenizer",
    "render_chat_template",
    "train_bpe",
    "train_bpe_from_iterator",
    "train_char",
    "train_char_from_iterator",
]
