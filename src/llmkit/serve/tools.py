"""Tool calling for `/v1/chat/completions`: `tools`, `tool_choice`, `parallel_tool_calls` -> a `ToolPlan`.

- `auto`: the model may write calls in its template's format (tokenizer/tool_calls.py); they are parsed out
  (only the first with `parallel_tool_calls: false`).
- `none`: the tools stay in the prompt, nothing is parsed: the reply is text.
- `required` / `{"type": "function", "function": {"name": ...}}`: the grammar engine forces one or more
  (one when `parallel_tool_calls` is false) calls to the declared function(s), arguments valid under each
  function's `parameters` schema.
A reply with calls has `message.tool_calls` and finish_reason "tool_calls".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmkit.errors import InputError
from llmkit.infer.grammar import Grammar, compile_grammar
from llmkit.serve.errors import APIError
from llmkit.serve.protocol import ChatCompletionRequest
from llmkit.serve.state import ServerState
from llmkit.tokenizer.tool_calls import ToolCallParser, detect_format, tool_call_schema, validate_tools


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]] | None  # rendered into the prompt
    fmt: str  # the tool-call format of the model's chat template
    parse: bool  # whether replies are parsed for calls (not for tool_choice "none")
    grammar: Grammar | None  # forced calls (tool_choice "required" or named)

    max_calls: int | None = None  # 1 with parallel_tool_calls=false

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.fmt, self.max_calls) if self.parse else None


def _named(choice: dict[str, Any]) -> str:
    fn = choice.get("function") if choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise APIError(
            'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
            400,
            param="tool_choice",
        )
    return name


def tool_plan(state: ServerState, body: ChatCompletionRequest) -> ToolPlan | None:
    """The request's tool setup, checked (a 400 names what is wrong); None when it declares no tools."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise APIError(f"tool_choice {choice!r} needs a non-empty 'tools' list", 400, param="tool_choice")
        return None
    try:
        tools = validate_tools(body.tools)
    except InputError as e:
        raise APIError(str(e), 400, param="tools") from None
    fmt = detect_format(state.tokenizer.chat_template)
    max_calls = None if body.parallel_tool_calls else 1
    if choice is None or choice in ("auto", "none"):
        return ToolPlan(tools, fmt, parse=choice != "none", grammar=None, max_calls=max_calls)
    declared = [t["function"]["name"] for t in tools]
    names = declared if choice == "required" else [_named(choice)]
    if names[0] not in declared:
        raise APIError(
            f"tool_choice names function {names[0]!r}, which is not in tools (declared: {', '.join(declared)})",
            400,
            param="tool_choice",
        )
    if body.response_format is not None or body.guided_choice is not None or body.guided_regex is not None:
        raise APIError(
            "tool_choice required/named forces a tool call: it cannot be combined with "
            "response_format, guided_choice or guided_regex",
            400,
            param="tool_choice",
        )
    grammar = Grammar.tool_call(fmt, tool_call_schema(tools, names, fmt), parallel=body.parallel_tool_calls)
    try:  # compiled now: a parameters schema the grammar engine rejects is a 400 before anything runs
        compile_grammar(state.tokenizer, grammar, state.engine.config.vocab_size, state.engine.eos_token_ids)
    except InputError as e:
        raise APIError(f"tools: {e}", 400, param="tools") from None
    return ToolPlan(tools, fmt, parse=True, grammar=grammar, max_calls=max_calls)


def finish_reason(reason: str | None, parser: ToolCallParser | None) -> str | None:
    """'tool_calls' when a reply that ended normally made calls; otherwise the engine's reason."""
    return "tool_calls" if reason == "stop" and parser is not None and parser.tool_calls else reason
