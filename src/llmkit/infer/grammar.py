"""Constrained decoding: a grammar masks each row's next-token logits (xgrammar).

A `Grammar` is a hashable description (JSON object, JSON schema, regex, a fixed choice of strings).
`Constraint` is one sequence's matcher over it: `mask_logits` sets the logits of tokens the grammar
forbids to -inf, `accept` advances it by the sampled token. When the grammar is complete only the
stop (EOS) tokens stay allowed, so a constrained sequence ends with finish_reason "stop".

Compiled grammars are cached per (tokenizer, vocab width, stop ids, grammar): the first request
with a schema pays the compile (milliseconds for small schemas), the rest reuse it.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any

import torch

from llmkit.errors import InputError
from llmkit.tokenizer.tool_calls import FORMATS, HERMES_CLOSE, HERMES_OPEN

GRAMMAR_KINDS = ("json_object", "json_schema", "regex", "choice", "tool_call")


@dataclass(frozen=True)
class Grammar:
    """What the output must match. `kind` is one of GRAMMAR_KINDS; `value` is the JSON schema
    (a JSON string), the regex, the choices (a JSON list of strings), "" for json_object, or for
    tool_call a JSON {"format", "schema", "parallel"}: one or more calls (`parallel`) written in a
    tool-call format of tokenizer/tool_calls.py, each a JSON `schema` (`tool_call_schema`)."""

    kind: str
    value: str = ""

    @staticmethod
    def json_schema(schema: dict[str, Any]) -> Grammar:
        return Grammar("json_schema", json.dumps(schema, sort_keys=True))

    @staticmethod
    def choice(options: list[str]) -> Grammar:
        return Grammar("choice", json.dumps(list(options)))

    @staticmethod
    def tool_call(fmt: str, schema: dict[str, Any], parallel: bool = True) -> Grammar:
        # not sort_keys: the schema's property order is the order the call is written in ("name" first)
        return Grammar("tool_call", json.dumps({"format": fmt, "schema": schema, "parallel": parallel}))


def _tool_call_ebnf(xgr: Any, value: str) -> str:
    """EBNF of one or more tool calls: each a JSON object under the schema, framed as the format writes it
    (hermes `<tool_call>` blocks, llama3_json `;`-separated objects, mistral a JSON list)."""
    spec = json.loads(value)
    fmt = spec["format"]
    if fmt not in FORMATS:
        raise InputError(f"unknown tool-call format {fmt!r}: expected one of {', '.join(FORMATS)}")
    call = str(xgr.Grammar.from_json_schema(json.dumps(spec["schema"]), any_whitespace=False, strict_mode=True))
    call = re.sub(r"\broot\b", "tool_call_object", call)
    # xgrammar's length-bounded strings admit raw control characters, which JSON forbids (RFC 8259)
    call = call.replace(r"[^\"\\\r\n]", r"[^\0-\x1f\"\\]")
    first, sep, last = {
        "hermes": (HERMES_OPEN + "\n", "\n" + HERMES_CLOSE + "\n" + HERMES_OPEN + "\n", "\n" + HERMES_CLOSE),
        "llama3_json": ("", "; ", ""),
        "mistral": ("[", ", ", "]"),  # the [TOOL_CALLS] mark is a special token: the parser accepts `[{` alone
    }[fmt]
    lit = json.dumps  # a JSON string literal is an EBNF string literal
    more = f" ({lit(sep)} tool_call_object)*" if spec["parallel"] else ""
    return f"root ::= {lit(first)} tool_call_object{more} {lit(last)}\n{call}"


_lock = threading.Lock()
_compilers: dict[tuple[int, int, tuple[int, ...]], Any] = {}
_controls: dict[tuple[int, int], torch.Tensor] = {}
_compiled: dict[tuple[int, int, tuple[int, ...], Grammar], Any] = {}


def _xgrammar() -> Any:
    """The xgrammar module, or a clear error naming the extra that installs it."""
    try:
        import xgrammar
    except ImportError as e:
        raise InputError(
            "constrained decoding (response_format, guided_choice, guided_regex) needs xgrammar: "
            "pip install 'llmkit[structured]'"
        ) from e
    return xgrammar


def _compiler(tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]) -> Any:
    xgr = _xgrammar()
    from transformers import PreTrainedTokenizerFast  # installed with xgrammar

    key = (id(tokenizer), vocab_size, stop_ids)
    with _lock:
        if key not in _compilers:
            backend = getattr(tokenizer, "backend", tokenizer)  # llmkit Tokenizer -> tokenizers.Tokenizer
            hf = PreTrainedTokenizerFast(tokenizer_object=backend)
            info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
            _compilers[key] = (tokenizer, xgr.GrammarCompiler(info))  # the tokenizer kept alive: id stays unique
        return _compilers[key][1]


def compile_grammar(tokenizer: Any, grammar: Grammar, vocab_size: int, stop_ids: set[int] | list[int]) -> Any:
    """The xgrammar CompiledGrammar (cached); `InputError` when the schema/regex is invalid."""
    if tokenizer is None:
        raise InputError("constrained decoding needs the model's tokenizer")
    stops = tuple(sorted(stop_ids))
    key = (id(tokenizer), vocab_size, stops, grammar)
    with _lock:
        hit = _compiled.get(key)
    if hit is not None:
        return hit
    compiler = _compiler(tokenizer, vocab_size, stops)
    try:
        if grammar.kind in ("json_object", "json_schema"):
            # compact JSON: with free whitespace a random-ish model wanders off into blank runs
            schema = '{"type": "object"}' if grammar.kind == "json_object" else grammar.value
            compiled = compiler.compile_json_schema(schema, strict_mode=True, any_whitespace=False)
        elif grammar.kind == "regex":
            compiled = compiler.compile_regex(grammar.value)
        elif grammar.kind == "choice":
            options = json.loads(grammar.value)
            if not options or not all(isinstance(o, str) for o in options):
                raise InputError("guided_choice must be a non-empty list of strings")
            compiled = compiler.compile_regex("|".join(re.escape(o) for o in options))
        elif grammar.kind == "tool_call":
            compiled = compiler.compile_grammar(_tool_call_ebnf(_xgrammar(), grammar.value))
        else:
            raise InputError(f"unknown grammar kind {grammar.kind!r}: expected one of {', '.join(GRAMMAR_KINDS)}")
    except InputError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError/ValueError on a bad schema or regex
        raise InputError(f"invalid {grammar.kind} for constrained decoding: {e}") from None
    with _lock:
        _compiled[key] = compiled
    return compiled


class Constraint:
    """One sequence's position in its grammar: fills its row of a batch's token bitmask, accepts sampled tokens."""

    def __init__(self, tokenizer: Any, grammar: Grammar, stop_ids: set[int]):
        self.tokenizer, self.grammar, self.stop_ids = tokenizer, grammar, stop_ids
        self.matcher: Any = None  # built at the first step, when the logits' width is known

    def fill_bitmask(self, bitmask: torch.Tensor, row: int, vocab_size: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (xgrammar's packed int32, bit j of word i =
        token 32*i + j)."""
        if self.matcher is None:
            compiled = compile_grammar(self.tokenizer, self.grammar, vocab_size, self.stop_ids)
            self.matcher = _xgrammar().GrammarMatcher(compiled)
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.grammar.kind in ("json_object", "json_schema"):
            # xgrammar's JSON strings admit raw control characters, which RFC 8259 forbids (they must
            # be escaped); compact JSON has no other place for them, so tokens holding one are banned
            bitmask[row] &= _allowed_text_words(self.tokenizer, vocab_size)

    def mask_logits(self, row: torch.Tensor) -> None:
        """Set the logits of forbidden tokens to -inf, in place (`row` [V])."""
        mask_logits(row[None], [0], [self])

    def accept(self, token: int) -> None:
        if self.matcher is not None and not self.matcher.is_terminated():
            self.matcher.accept_token(token)


_bitmasks = threading.local()  # per thread (engine loop, generate callers): a reusable [B, words] bitmask
# byte value -> its 8 bits, negated: BANNED_BITS[x, j] is True when bit j of byte x is 0 (token forbidden)
_BANNED_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).eq(0)  # bool [256, 8]


def mask_logits(logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> None:
    """Set the logits [B, V] of the tokens each row's grammar forbids to -inf, in place: row rows[i] under
    constraints[i]. One packed bitmask [n, ceil(V/32)] for the batch, each matcher fills its row; on CPU it
    is unpacked by a byte lookup table (one gather, one masked fill for the batch), elsewhere xgrammar's
    kernel applies it."""
    B, V = logits.shape
    n, words = len(rows), (V + 31) // 32
    bitmask = getattr(_bitmasks, "buf", None)
    if bitmask is None or bitmask.shape[0] < n or bitmask.shape[1] != words:
        bitmask = _bitmasks.buf = _xgrammar().allocate_token_bitmask(max(n, B), V)
    for i, c in enumerate(constraints):
        c.fill_bitmask(bitmask, i, V)
    if logits.device.type != "cpu" or sys.byteorder != "little":
        bits = torch.full((B, words), -1, dtype=torch.int32)
        bits[rows] = bitmask[:n]
        _xgrammar().apply_token_bitmask_inplace(logits, bits.to(logits.device), vocab_size=V, indices=rows)
        return
    # little-endian words: byte k of word i holds tokens 32*i + 8*k .. +7, so the bytes in order are the tokens
    byte_ids = bitmask[:n].view(torch.uint8).reshape(-1).int()
    banned = _BANNED_BITS.index_select(0, byte_ids).view(n, -1)[:, :V]  # bool [n, V]
    if n == B and rows == list(range(B)):
        logits.masked_fill_(banned, float("-inf"))
    else:
        for i, r in enumerate(rows):
            logits[r].masked_fill_(banned[i], float("-inf"))


def _allowed_text_words(tokenizer: Any, V: int) -> torch.Tensor:
    """int32 [ceil(V/32)]: xgrammar's packed bitmask with the bits of tokens whose text holds a control
    character U+0000..U+001F cleared (cached)."""
    key = (id(tokenizer), V)
    with _lock:
        hit = _controls.get(key)
    if hit is None:
        n = min(V, tokenizer.vocab_size)
        text = [tokenizer.decode([i]) for i in range(n)]
        allowed = torch.ones((V + 31) // 32 * 32, dtype=torch.int64)
        allowed[:n] = torch.tensor([not any(ord(c) < 0x20 for c in t) for t in text], dtype=torch.int64)
        packed = (allowed.view(-1, 32) << torch.arange(32, dtype=torch.int64)).sum(1)  # bit j = token 32*i + j
        hit = packed.to(torch.int32)  # wraps to the same 32 bits (two's complement)
        with _lock:
            _controls[key] = hit
    return hit
