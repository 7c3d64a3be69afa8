"""llmkit.data: the token layer above the tokenizer: tokenize documents (`llmkit.text`) into shards; read them.

`clean_text` is re-exported from `llmkit.text` for callers of the earlier layout.
"""

from llmkit.data.prepare import format_report, prepare, token_dtype
from llmkit.data.shards import SequentialBatches, TokenShards, get_batch, load_tokens, read_manifest
from llmkit.text.clean import clean_text

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
