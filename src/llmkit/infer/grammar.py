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
    """One sequence's position in its grammar: masks logits, accepts sampled tokens."""

    def __init__(self, tokenizer: Any, grammar: Grammar, stop_ids: set[int]):
        self.tokenizer, self.grammar, self.stop_ids = tokenizer, grammar, stop_ids
        self.matcher: Any = None  # built at the first step, when the logits' width is known
        self.bitmask: torch.Tensor | None = None

    def mask_logits(self, row: torch.Tensor) -> None:
        """Set the logits of forbidden tokens to -inf, in place (`row` [V])."""
        xgr = _xgrammar()

        V = row.shape[-1]
        if self.matcher is None:
            self.matcher = xgr.GrammarMatcher(compile_grammar(self.tokenizer, self.grammar, V, self.stop_ids))
            self.bitmask = xgr.allocate_token_bitmask(1, V)
        self.matcher.fill_next_token_bitmask(self.bitmask, 0)
        allowed = _unpack(self.bitmask[0], V)
        if self.grammar.kind in ("json_object", "json_schema"):
            # xgrammar's JSON strings admit raw control characters, which RFC 8259 forbids (they must
            # be escaped); compact JSON has no other place for them, so tokens holding one are banned
            allowed &= ~_control_tokens(self.tokenizer, V)
        allowed = allowed.to(row.device)
        row.masked_fill_(~allowed, float("-inf"))

    def accept(self, token: int) -> None:
        if self.matcher is not None and not self.matcher.is_terminated():
            self.matcher.accept_token(token)


def _control_tokens(tokenizer: Any, V: int) -> torch.Tensor:
    """bool [V]: the tokens whose text holds a control character U+0000..U+001F (cached)."""
    key = (id(tokenizer), V)
    with _lock:
        hit = _controls.get(key)
    if hit is None:
        n = min(V, tokenizer.vocab_size)
        text = [tokenizer.decode([i]) for i in range(n)]
        hit = torch.zeros(V, dtype=torch.bool)
        hit[:n] = torch.tensor([any(ord(c) < 0x20 for c in t) for t in text])
        with _lock:
            _controls[key] = hit
    return hit


def _unpack(bits: torch.Tensor, V: int) -> torch.Tensor:
    """xgrammar's packed int32 bitmask [ceil(V/32)] -> bool [V] (bit j of word i = token 32*i + j)."""
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits[:, None] >> shifts) & 1).bool().reshape(-1)[:V]
