"""Incremental detokenization: token ids in, UTF-8-safe text deltas out.

Decoding token by token breaks on byte-level BPE (a Chinese character or an emoji spans
several tokens) and on SentencePiece (the '▁' prefix space is dropped at the start of a
decode). So each step decodes a short window that starts a few tokens back and emits only
what the new token added, holding back while the text ends in an incomplete character
(U+FFFD). This is the prefix/read-offset scheme used by TGI and vLLM.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens kept as left context for the first deltas
# the text of one token decoded alone, per tokenizer: the window before each new token is usually
# the single token emitted last step (half of the decodes of a stream)
_ONE_TOKEN: weakref.WeakKeyDictionary[Any, dict[tuple[int, bool], str]] = weakref.WeakKeyDictionary()


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turn a stream of token ids into text deltas that never split a UTF-8 character.

    `prompt_ids`, when given, provides left context so the first generated token is decoded as
    a continuation (e.g. keeps its SentencePiece prefix space). Concatenating every `add()` and
    the final `flush()` gives the decoded text of all added tokens.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:]) if prompt_ids else []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = len(self.ids)  # tokens before this have been emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        if len(ids) != 1:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""
        try:
            cache = _ONE_TOKEN[self.tokenizer]
        except KeyError:
            cache = _ONE_TOKEN.setdefault(self.tokenizer, {})
        except TypeError:  # a tokenizer without weak references: no cache
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        key = (ids[0], self.skip_special_tokens)
        text = cache.get(key)
        if text is None:
            text = cache[key] = self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return text

    def add(self, token_id: int) -> str:
        """Append one token; return the new complete text (maybe "")."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        delta = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
