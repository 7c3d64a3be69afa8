"""llmkit.data: clean, deduplicate, tokenize and pack text into token shards; read them back."""

from llmkit.data.clean import clean_text
from llmkit.data.prepare import format_report, prepare, token_dtype
from llmkit.data.shards import SequentialBatches, TokenShards, get_batch, load_tokens, read_manifest

__all__ = [
    "SequentialBatches",
    "TokenShards",
    "clean_text",
    "format_report",
    "get_batch",
    "load_tokens",
    "prepare",
    "read_manifest",
    "token_dtype",
]
