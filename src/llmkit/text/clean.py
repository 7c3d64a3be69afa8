"""Language-agnostic text cleaning: unicode normalisation, control characters, whitespace."""

from __future__ import annotations

import re
import unicodedata

from llmkit.errors import InputError

NORMALIZATIONS = ("NFC", "NFKC", "none")

# C0/C1 control characters except \t and \n, plus DEL and the byte-order mark.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
# Unicode space separators (NBSP, thin space, ...) become a plain space; the ideographic space U+3000
# is kept because CJK text uses it on purpose (NFKC turns it into ' ' anyway).
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, normalization: str = "NFC", strip_whitespace: bool = True) -> str:
    """Normalise `text`: unicode form, drop control characters (keep \\n, \\t), tidy whitespace.

    Whitespace tidying: CRLF/CR -> LF, exotic spaces -> ' ', no trailing spaces on lines,
    at most one blank line in a row, no leading/trailing whitespace. Indentation is kept.
    """
    if normalization not in NORMALIZATIONS:
        raise InputError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if normalization != "none":
        text = unicodedata.normalize(normalization, text)
    text = _CONTROL.sub("", text)
    if strip_whitespace:
        text = _SPACES.sub(" ", text)
        text = _TRAILING_SPACE.sub("\n", text)
        text = _MANY_BLANK_LINES.sub("\n\n", text)
        text = text.strip()
    return text
