"""Tool calls in chat text: render `tools` / `tool_calls` / `tool` messages into a prompt, parse them back out.

Contract (used by serve's /v1/chat/completions, infer's tool-call grammar, agent, SFT data):

- Messages and tools are OpenAI-shaped dicts:
  tool      = {"type": "function", "function": {"name", "description"?, "parameters"? (JSON schema)}}
  tool call = {"id", "type": "function", "function": {"name", "arguments": JSON string}}
  messages  = {"role": "assistant", "content": str | None, "tool_calls": [tool call, ...]},
              {"role": "tool", "tool_call_id", "content"}.
- `FORMATS`: how a model family writes a call.
  - "hermes" (Hermes / Qwen2.5, and llmkit's documented default for models trained here):
    `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one block per call, content may precede.
  - "llama3_json" (Llama 3.1 JSON tool calling): the whole reply is `{"name": "f", "parameters": {...}}`
    (optionally after `<|python_tag|>`); several calls are separated by `;`.
  - "mistral": `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`; call ids are 9 alphanumerics.
- `detect_format(chat_template)` picks the format from the template text (hermes when unknown).
- `prepare_chat(messages, tools, chat_template) -> (messages, template_kwargs)`: what to hand
  `Tokenizer.encode_chat`. A template that knows tools (Qwen2.5, Llama 3.1, Mistral) gets `tools=` and the
  messages with `arguments` as dicts, as transformers' templates expect. A template that does not gets plain
  {role, content} messages in the hermes format: calls as `<tool_call>` blocks in the assistant turn, tool
  results as `<tool_response>` blocks in a user turn, and the tool list in the system turn. For llmkit's own
  ChatML template (models trained here) that list is `compact_tools_prompt` (llmkit's documented default:
  one `name(param: type) - description` line per tool and the call syntax); for other templates it is the
  text Qwen2.5's template writes (`tools_system_prompt`).
- `format_tool_calls(calls, fmt, content)` -> the assistant text that makes `calls` in format `fmt`
  (the training target and what the model is asked to write).
- `ToolCallParser(fmt, max_calls=None)`: incremental (calls past `max_calls` are dropped).
  `feed(text_delta)` and `close()` return OpenAI streaming deltas,
  `{"content": str}` or `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}`
  first for each call, then `{"tool_calls": [{"index", "function": {"arguments": fragment}}]}`; after
  `close()`, `.content` (str | None) and `.tool_calls` (complete calls) hold the result. The fragments of
  a call concatenate to its `arguments`. Text that looks like a call but is not valid JSON stays content.
- `parse_tool_calls(text, fmt) -> (content, tool_calls)`: the same parser over a whole reply.
- `validate_tools(tools)` / `tool_call_schema(tools, names, fmt)`: checks (InputError) and the JSON schema
  of a call `{"name", "arguments"}` (llama3_json: "parameters") to one of the named tools (for
  grammar-forced tool_choice).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

from llmkit.errors import InputError
from llmkit.tokenizer.chat_template import CHATML_TEMPLATE

FORMATS = ("hermes", "llama3_json", "mistral")
DEFAULT_FORMAT = "hermes"

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARK = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
_NAME = re.compile(r"[a-zA-Z0-9_.-]{1,64}")
_ALNUM = string.ascii_letters + string.digits


# ---- tools ---------------------------------------------------------------------------------------
def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """The tools list, checked: each {"type": "function", "function": {"name", "parameters"?}}; InputError."""
    if not isinstance(tools, list) or not tools:
        raise InputError('tools must be a non-empty list of {"type": "function", "function": {"name": ...}}')
    names = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise InputError(f'tools[{i}] must be {{"type": "function", "function": {{"name", "parameters"?}}}}')
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InputError(f"tools[{i}].function.name must be 1-64 characters of a-z, A-Z, 0-9, _ . - (got {name!r})")
        if name in names:
            raise InputError(f"tools[{i}]: duplicate function name {name!r}")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise InputError(f"tools[{i}].function.parameters must be a JSON schema of type 'object'")
        props, required = (params or {}).get("properties", {}), (params or {}).get("required", [])
        if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
            raise InputError(f"tools[{i}].function.parameters.properties must map names to JSON schemas")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise InputError(f"tools[{i}].function.parameters.required must be a list of property names")
    return tools


def tool_call_schema(
    tools: list[dict[str, Any]], names: list[str] | None = None, fmt: str = DEFAULT_FORMAT
) -> dict[str, Any]:
    """JSON schema of one call {"name": ..., "arguments": {...}} to one of `names` (default: every tool);
    the arguments key is "parameters" in the llama3_json format."""
    key = "parameters" if fmt == "llama3_json" else "arguments"
    options = []
    for t in tools:
        fn = t["function"]
        if names is None or fn["name"] in names:
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            options.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": fn["name"]}, key: params},
                    "required": ["name", key],
                    "additionalProperties": False,
                }
            )
    return options[0] if len(options) == 1 else {"anyOf": options}


def new_call_id(fmt: str = DEFAULT_FORMAT) -> str:
    """A fresh tool-call id: 'call_' + 24 alphanumerics (OpenAI's shape), 9 alphanumerics for mistral."""
    n = 9 if fmt == "mistral" else 24
    rand = "".join(secrets.choice(_ALNUM) for _ in range(n))
    return rand if fmt == "mistral" else "call_" + rand


# ---- rendering -----------------------------------------------------------------------------------
def detect_format(chat_template: str | None) -> str:
    """The tool-call format a chat template writes (hermes when the template does not say)."""
    t = chat_template or ""
    if MISTRAL_MARK in t:
        return "mistral"
    if PYTHON_TAG in t or "<|eom_id|>" in t or "ipython" in t:
        return "llama3_json"
    return DEFAULT_FORMAT


def template_knows_tools(chat_template: str | None) -> bool:
    """Whether the template renders `tools` and `tool_calls` itself (Hub templates of tool-using families)."""
    t = chat_template or ""
    return "tools" in t and "tool_calls" in t


def _args_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _args_value(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _call_parts(call: dict[str, Any]) -> tuple[str, Any]:
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        shape = '{"id", "type": "function", "function": {"name", "arguments"}}'
        raise InputError(f"a tool call must be {shape}, got {call!r:.120}")
    return fn["name"], _args_value(fn.get("arguments", {}))


def format_tool_calls(calls: list[dict[str, Any]], fmt: str = DEFAULT_FORMAT, content: str | None = None) -> str:
    """The assistant text that makes `calls` (OpenAI tool-call dicts) in format `fmt`, after `content`."""
    if fmt not in FORMATS:
        raise InputError(f"unknown tool-call format {fmt!r}: expected one of {', '.join(FORMATS)}")
    parts = [_call_parts(c) for c in calls]
    dump = lambda x: json.dumps(x, ensure_ascii=False)  # noqa: E731
    text = content or ""
    if fmt == "hermes":
        for i, (name, args) in enumerate(parts):
            if text or i:
                text += "\n"
            text += f'{HERMES_OPEN}\n{{"name": {dump(name)}, "arguments": {dump(args)}}}\n{HERMES_CLOSE}'
        return text
    if fmt == "llama3_json":
        return text + "; ".join(f'{{"name": {dump(n)}, "parameters": {dump(a)}}}' for n, a in parts)
    return text + MISTRAL_MARK + dump([{"name": n, "arguments": a} for n, a in parts])


def _signature(tool: dict[str, Any]) -> str:
    """`name(param: type, opt?: type) - first sentence of the description` of one tool."""
    fn = tool["function"]
    params = fn.get("parameters") or {}
    required = set(params.get("required", []))
    args = ", ".join(
        f"{k}{'' if k in required else '?'}: {v.get('type', 'any') if isinstance(v.get('type'), str) else 'any'}"
        for k, v in (params.get("properties") or {}).items()
    )
    desc = (fn.get("description") or "").strip().split("\n")[0]
    return f"{fn['name']}({args})" + (f" - {desc}" if desc else "")


def compact_tools_prompt(tools: list[dict[str, Any]]) -> str:
    """llmkit's default tool prompt for models trained here: one signature line per tool and the call syntax
    (~4x shorter than Qwen2.5's JSON listing: what a small model reads on every step)."""
    lines = "".join(f"\n{_signature(t)}" for t in tools)
    return f'Tools:{lines}\nCall: <tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call>'


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The tool list as Qwen2.5's template writes it into the system turn (hermes format)."""
    listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call>"
    )


def prepare_chat(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, chat_template: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra template variables) to render a conversation with tools and tool calls (see module doc)."""
    has_calls = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if not tools and not has_calls:
        return messages, {}
    if template_knows_tools(chat_template):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {
                        "id": c.get("id"),
                        "type": "function",
                        "function": {"name": _call_parts(c)[0], "arguments": _call_parts(c)[1]},
                    }
                    for c in m["tool_calls"]
                ]
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    # hermes text inside a plain template: llmkit's compact tool list for its own ChatML, Qwen2.5's otherwise
    out: list[dict[str, Any]] = []
    if tools:
        block = compact_tools_prompt(tools) if chat_template == CHATML_TEMPLATE else tools_system_prompt(tools)
        if messages and messages[0].get("role") in ("system", "developer"):
            out.append({"role": "system", "content": (messages[0].get("content") or "") + "\n\n" + block})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": format_tool_calls(m["tool_calls"], "hermes", content)})
        elif role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool": True})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content", "name")} | {"content": content})
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out], {}


# ---- parsing -------------------------------------------------------------------------------------
def _scan_value(s: str, i: int) -> int | None:
    """End index of the JSON value starting at s[i] (an object, array or string), or None if incomplete."""
    depth, in_str, esc = 0, False, False
    for j in range(i, len(s)):
        c = s[j]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
                if depth == 0:
                    return j + 1
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (held back while streaming)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _header_delta(index: int, call_id: str, name: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, **_call(call_id, name, "")}]}


def _args_delta(index: int, fragment: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}


class ToolCallParser:
    """Incremental parser of a model's reply into content and OpenAI tool calls (see module doc)."""

    def __init__(self, fmt: str = DEFAULT_FORMAT, max_calls: int | None = None):
        self.max_calls = max_calls  # calls after the first `max_calls` are dropped (parallel_tool_calls=false)
        if fmt not in FORMATS:
            raise InputError(f"unknown tool-call format {fmt!r}: expected one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.buf = ""  # text not yet turned into deltas
        self.mode = "text" if fmt != "llama3_json" else "start"  # text | call | calls (between calls) | start
        self.content_parts: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self._header_sent = False
        self._args_sent = 0  # characters of the current call's arguments already streamed

    @property
    def content(self) -> str | None:
        text = "".join(self.content_parts)
        return text if text else None

    def _emit_content(self, text: str, out: list[dict[str, Any]]) -> None:
        if text:
            self.content_parts.append(text)
            out.append({"content": text})

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.buf += delta
        out: list[dict[str, Any]] = []
        self._step(out, final=False)
        return self._capped(out)

    def _capped(self, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.max_calls is None:
            return out
        del self.tool_calls[self.max_calls :]
        return [d for d in out if "tool_calls" not in d or d["tool_calls"][0]["index"] < self.max_calls]

    def close(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        self._step(out, final=True)
        if self.mode == "call" and self._header_sent:  # cut off inside a call: keep what was streamed
            m = _HEADER.match(self.buf)
            args = self.buf[m.end() : m.end() + self._args_sent] if m else ""
            self.tool_calls.append(_call(self._call_id, self._name, args))
            self._header_sent, self.buf = False, ""
        self._emit_content(self.buf, out)
        self.buf = ""
        return self._capped(out)

    # one pass over the buffer; loops while progress is made
    def _step(self, out: list[dict[str, Any]], final: bool) -> None:
        while True:
            before = (self.mode, len(self.buf), len(out))
            if self.mode == "start":
                self._start(out, final)
            elif self.mode == "text":
                self._text(out, final)
            elif self.mode == "calls":
                self._between(out, final)
            elif self.mode == "call":
                self._call(out, final)
            if (self.mode, len(self.buf), len(out)) == before:
                return

    def _start(self, out: list[dict[str, Any]], final: bool) -> None:  # llama3_json: a call iff it starts with '{'
        s = self.buf.lstrip()
        if s.startswith(PYTHON_TAG):
            s = s[len(PYTHON_TAG) :].lstrip()
        if not s and not final:
            return
        if s.startswith("{"):
            self.buf, self.mode = s, "call"
        elif s and PYTHON_TAG.startswith(s) and not final:
            return
        else:
            self.mode = "text"

    def _text(self, out: list[dict[str, Any]], final: bool) -> None:
        if self.fmt == "llama3_json":
            self._emit_content(self.buf, out)
            self.buf = ""
            return
        marker = HERMES_OPEN if self.fmt == "hermes" else MISTRAL_MARK
        k = self.buf.find(marker)
        if self.fmt == "mistral" and not self.content_parts and k < 0 and self.buf.lstrip().startswith("[{"):
            k, marker = self.buf.find("["), ""  # the [TOOL_CALLS] special token was dropped by the detokenizer
        if k >= 0:
            before = self.buf[:k]
            if self.fmt == "hermes" and before.endswith("\n"):
                before = before[:-1]  # the newline format_tool_calls writes before a call
            self._emit_content(before, out)
            self.buf = self.buf[k + len(marker) :]
            if self.fmt == "hermes":
                self.mode = "call"
            else:
                self.mode = "calls"
                self._mistral_open = False
            return
        hold = 0 if final else max(_held_prefix(self.buf, marker), _held_prefix(self.buf, "\n" + marker))
        if self.fmt == "mistral" and not self.content_parts and not final and "[{".startswith(self.buf.lstrip()):
            hold = len(self.buf)
        self._emit_content(self.buf[: len(self.buf) - hold], out)
        self.buf = self.buf[len(self.buf) - hold :]

    def _between(self, out: list[dict[str, Any]], final: bool) -> None:
        """Between calls: hermes waits for the next <tool_call>, llama3 for ';', mistral inside its [...]."""
        s = self.buf.lstrip()
        if self.fmt == "mistral":
            if not getattr(self, "_mistral_open", False):
                if s.startswith("["):
                    self._mistral_open, s = True, s[1:].lstrip()
                elif not s:
                    self.buf = s
                    return
            if s.startswith(","):
                s = s[1:].lstrip()
            if s.startswith("{"):
                self.buf, self.mode = s, "call"
                return
            if s.startswith("]"):
                self.buf, self.mode = s[1:], "text"
                return
            self.buf = s
            return
        if self.fmt == "llama3_json":
            if s.startswith(";"):
                s = s[1:].lstrip()
            if s.startswith("{"):
                self.buf, self.mode = s, "call"
                return
            self.buf = s
            if s and (final or not s.startswith(";")):
                self.mode = "text"
            return
        # hermes: whitespace after </tool_call> is dropped; then text again (which may open another call)
        self.buf = s
        if s or final:
            self.mode = "text"

    def _call(self, out: list[dict[str, Any]], final: bool) -> None:
        index = len(self.tool_calls)
        m = _HEADER.match(self.buf)
        if m and not self._header_sent:
            try:
                name = json.loads(f'"{m.group(1)}"')
            except json.JSONDecodeError:
                name = None
            if name is not None:
                self._header_sent, self._args_sent = True, 0
                self._call_id = new_call_id(self.fmt)
                self._name = name
                out.append(_header_delta(index, self._call_id, name))
        if self._header_sent and m and self.buf[m.end() : m.end() + 1] == "{":
            a = m.end()
            end = _scan_value(self.buf, a)
            upto = end if end is not None else len(self.buf)
            if upto - a > self._args_sent:
                out.append(_args_delta(index, self.buf[a + self._args_sent : upto]))
                self._args_sent = upto - a
        # the whole call object
        end = _scan_value(self.buf, self.buf.find("{")) if "{" in self.buf else None
        if end is None:
            if final and not self._header_sent:  # cut off before its name: the text it was, as content
                self._emit_content((HERMES_OPEN if self.fmt == "hermes" else "") + self.buf, out)
                self.buf, self.mode = "", "text"
            return
        obj_text, rest = self.buf[:end], self.buf[end:]
        if self.fmt == "hermes":
            r = rest.lstrip()
            if r.startswith(HERMES_CLOSE):
                rest = r[len(HERMES_CLOSE) :]
            elif HERMES_CLOSE.startswith(r):  # the closing tag is still coming (or was cut off at the end)
                if not final:
                    return
                rest = ""
            else:
                r = None  # something else after the object: not a well-formed call
        else:
            r = ""
        call = self._finish_call(obj_text) if r is not None else None
        if call is None and not self._header_sent:  # not a call after all: it is text
            raw = (HERMES_OPEN if self.fmt == "hermes" else "") + self.buf
            self._emit_content(raw if self.fmt != "hermes" else raw[: len(raw) - len(rest)], out)
            self.buf = rest if self.fmt == "hermes" else ""
            self.mode = "text"
            return
        if call is None:  # streamed a header already: keep the call with what we have
            m = _HEADER.match(self.buf)
            call = _call(self._call_id, self._name, self.buf[m.end() : m.end() + self._args_sent] if m else "")
        if not self._header_sent:
            out.append(_header_delta(index, call["id"], call["function"]["name"]))
        left = call["function"]["arguments"][self._args_sent :] if self._header_sent else call["function"]["arguments"]
        if left:
            out.append(_args_delta(index, left))
        self.tool_calls.append(call)
        self._header_sent, self._args_sent = False, 0
        self.buf, self.mode = rest, "calls"

    def _finish_call(self, obj_text: str) -> dict[str, Any] | None:
        try:
            obj = json.loads(obj_text)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        key = "arguments" if "arguments" in obj else "parameters"
        args = obj.get(key, {})
        if self._header_sent:
            m = _HEADER.match(obj_text)
            a = m.end() if m else -1
            end = _scan_value(obj_text, a) if a >= 0 and obj_text[a : a + 1] == "{" else None
            text = obj_text[a:end] if end is not None else _args_text(args)
            return _call(self._call_id, self._name, text)
        if not isinstance(args, dict | str):
            return None
        return _call(new_call_id(self.fmt), obj["name"], _args_text(args))


def parse_tool_calls(text: str, fmt: str = DEFAULT_FORMAT) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a whole reply in format `fmt` (content None when there is none)."""
    p = ToolCallParser(fmt)
    p.feed(text)
    p.close()
    return p.content, p.tool_calls
