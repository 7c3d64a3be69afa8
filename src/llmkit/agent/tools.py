"""Tools: plain Python functions whose type hints and docstring give the JSON schema the model sees.

    @tool
    def add(a: int, b: int = 0) -> int:
        '''Add two integers.

        Args:
            a: the first number
            b: the second number
        '''
        return a + b

`add.schema` is the OpenAI `{"type": "function", "function": {name, description, parameters}}` entry.
The arguments a model sends are validated by pydantic against the same signature; a bad argument,
an exception or a timeout becomes an error observation (`Observation.error`), never a crash.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import pydantic

from llmkit.errors import InputError

MAX_OBSERVATION_CHARS = 4000  # what a tool result may put into the context


@dataclass
class Observation:
    """What a tool call returned: the text for the model, and whether it is an error."""

    text: str
    error: bool = False
    seconds: float = 0.0


def _doc_parts(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) from a Google-style docstring (`Args:` / `Parameters:`)."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    desc, params, section, current = [], {}, None, None
    for line in lines:
        stripped = line.strip()
        if re.fullmatch(r"(Args|Arguments|Parameters|Params):", stripped):
            section = "args"
            continue
        if re.fullmatch(r"[A-Z][A-Za-z ]*:", stripped):  # Returns:, Raises:, ...
            section = "other"
            continue
        if section == "args":
            m = re.match(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", stripped)
            if m and line.startswith((" ", "\t")) and not line.startswith(("        ", "\t\t")):
                current = m.group(1)
                params[current] = m.group(2)
            elif current and stripped:
                params[current] += " " + stripped
        elif section is None:
            desc.append(line)
    return "\n".join(desc).strip(), params


def _strip_titles(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


@dataclass
class Tool:
    """A callable the agent may use: `name`, `description`, JSON-schema `parameters`, and `fn(**args)`."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    timeout: float | None = None  # seconds; None = the agent's per-tool timeout
    validator: type[pydantic.BaseModel] | None = field(default=None, repr=False)

    @property
    def schema(self) -> dict[str, Any]:
        """The OpenAI `tools` entry."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def __call__(self, **kwargs: Any) -> Any:
        return self.fn(**kwargs)

    def check_arguments(self, arguments: Any) -> dict[str, Any]:
        """The arguments as keyword arguments for `fn`; `InputError` saying what is wrong when they do not fit."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise InputError(
                    f"arguments of {self.name} are not valid JSON ({e.msg}): {arguments[:200]!r}") from None
        if not isinstance(arguments, dict):
            raise InputError(f"arguments of {self.name} must be a JSON object, got {json.dumps(arguments)[:200]}")
        if self.validator is None:
            return arguments
        try:
            parsed = self.validator.model_validate(arguments)
        except pydantic.ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}" for err in e.errors())
            raise InputError(f"bad arguments for {self.name}: {problems}; expected {json.dumps(self.parameters)}") \
                from None
        return {k: getattr(parsed, k) for k in type(parsed).model_fields}

    def run(self, arguments: Any, timeout: float | None = None) -> Observation:
        """Call the tool; bad arguments, an exception or running past `timeout` give an error observation."""
        t0 = time.monotonic()
        try:
            kwargs = self.check_arguments(arguments)
        except InputError as e:
            return Observation(f"Error: {e}", True, time.monotonic() - t0)
        limit = self.timeout if self.timeout is not None else timeout
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = self.fn(**kwargs)
            except BaseException as e:  # noqa: BLE001 - every failure is reported to the model
                box["error"] = e

        worker = threading.Thread(target=target, name=f"tool-{self.name}", daemon=True)
        worker.start()
        worker.join(limit)
        seconds = time.monotonic() - t0
        if worker.is_alive():  # a Python thread cannot be killed: it is abandoned (daemon) and its result dropped
            return Observation(f"Error: {self.name} timed out after {limit:g} s", True, seconds)
        if "error" in box:
            e = box["error"]
            return Observation(f"Error: {self.name} raised {type(e).__name__}: {e}", True, seconds)
        return Observation(format_result(box.get("value")), False, seconds)


def format_result(value: Any, limit: int = MAX_OBSERVATION_CHARS) -> str:
    """A tool's return value as observation text (JSON for containers), truncated to `limit` characters."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        text = str(int(value))
    elif isinstance(value, int | float | bool) or value is None:
        text = json.dumps(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    if len(text) > limit:
        text = text[:limit] + f"\n... [truncated {len(text) - limit} characters]"
    return text


def _make_tool(fn: Callable[..., Any], name: str | None, description: str | None, timeout: float | None) -> Tool:
    name = name or fn.__name__
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}", name):
        raise InputError(f"tool name {name!r} must be 1-64 letters, digits, '_' or '-'")
    desc, param_docs = _doc_parts(fn.__doc__)
    try:
        hints = get_type_hints(fn)
    except Exception as e:  # noqa: BLE001 - an unresolvable annotation
        raise InputError(f"tool {name}: cannot resolve its type hints ({e})") from None
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise InputError(f"tool {name}: *args/**kwargs cannot be described by a JSON schema; name every parameter")
        if p.name not in hints:
            raise InputError(f"tool {name}: parameter {p.name!r} needs a type hint (it gives the JSON schema)")
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (hints[p.name], pydantic.Field(default, description=param_docs.get(p.name)))
    validator = pydantic.create_model(f"{name}_arguments", **fields)
    params = _strip_titles(validator.model_json_schema())
    params.setdefault("properties", {})
    params.setdefault("required", [])
    return Tool(name, description if description is not None else desc, params, fn, timeout, validator)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         timeout: float | None = None) -> Any:
    """Turn a function into a `Tool` (`@tool` or `@tool(name=..., timeout=...)`); the schema comes from
    its type hints and the docstring's first paragraph and `Args:` section."""
    if fn is None:
        return lambda f: _make_tool(f, name, description, timeout)
    return _make_tool(fn, name, description, timeout)


class ToolRegistry:
    """Tools by name; `run(name, arguments)` never raises for what the model asks."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = (), timeout: float = 30.0):
        self.tools: dict[str, Tool] = {}
        self.timeout = timeout
        for t in tools:
            self.add(t)

    def add(self, t: Tool | Callable[..., Any]) -> Tool:
        if not isinstance(t, Tool):
            if not callable(t):
                raise InputError(f"a tool must be a function or an llmkit.agent.Tool, got {type(t).__name__}")
            t = tool(t)
        if t.name in self.tools:
            raise InputError(f"two tools are named {t.name!r}; tool names must be unique")
        self.tools[t.name] = t
        return t

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.tools.values()]

    def run(self, name: str, arguments: Any) -> Observation:
        t = self.tools.get(name)
        if t is None:
            return Observation(f"Error: no tool named {name!r}; the tools are: {', '.join(self.tools) or 'none'}",
                               True)
        return t.run(arguments, self.timeout)

    def describe(self) -> str:
        """One line per tool (name, arguments, description), for text prompts (ReAct)."""
        lines = []
        for t in self.tools.values():
            props = t.parameters.get("properties", {})
            args = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in props.items())
            first = t.description.splitlines()[0] if t.description else ""
            lines.append(f"- {t.name}({args}): {first}")
        return "\n".join(lines)
