"""llmkit.text: the text layer below the tokenizer: read documents, clean them, deduplicate them."""

from llmkit.text.clean import clean_text
from llmkit.text.dedup import Deduplicator
from llmkit.text.sources import Document, expand_inputs, iter_documents

__all__ = ["Deduplicator", "Document", "clean_text", "expand_inputs", "iter_documents"]
