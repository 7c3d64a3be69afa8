"""Agent traces: one JSON object per line, written as the run goes (a crash leaves the steps so far).

Events: `start` (task, model, loop, tools), `model` (step, prompt messages, output, tool calls, tokens,
seconds), `tool` (step, name, arguments, observation, error, seconds), `memory` (summaries, recalled
facts), `end` (answer, why it stopped, totals). `format_trace(path)` renders a file for reading.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any

from llmkit.errors import InputError


class TraceWriter:
    """Appends events to a JSONL file (truncated when the run starts); a no-op without a path."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.events: list[dict[str, Any]] = []
        self._f = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self.events.append(record)
        if self._f is not None:
            self._f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self._f.flush()
        return record

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_trace(path: str | Path) -> list[dict[str, Any]]:
    """The events of a trace file; `InputError` naming the line when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"trace file {str(p)!r} does not exist "
                         "(expected the JSONL file of `llmkit agent run --trace`)")
    events = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{p}:{i}: not JSON ({err.msg}); expected one agent trace event per line") from None
        if not isinstance(e, dict) or "event" not in e:
            raise InputError(f"{p}:{i}: expected an object with an 'event' field, got {line[:80]!r}")
        events.append(e)
    if not events:
        raise InputError(f"trace file {p} is empty")
    return events


def _indent(text: str, prefix: str = "    ", width: int = 110, max_lines: int = 30) -> str:
    lines = []
    for para in str(text).splitlines() or [""]:
        lines += textwrap.wrap(para, width, replace_whitespace=False, drop_whitespace=False) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines)"]
    return "\n".join(prefix + line for line in lines)


def format_trace(trace: str | Path | list[dict[str, Any]], show_prompts: bool = False) -> str:
    """A trace (a file, or `AgentResult.trace`) as readable text: the task, each step's output, tool calls and
    observations, and the answer."""
    out = []
    for e in trace if isinstance(trace, list) else read_trace(trace):
        kind = e["event"]
        if kind == "start":
            model = e.get("model", {})
            out.append(f"task: {e.get('task')}")
            out.append(f"model: {model.get('model') or model.get('base_url')} ({model.get('kind')}), loop: "
                       f"{e.get('loop')}, tools: {', '.join(e.get('tool_names', [])) or 'none'}, "
                       f"max steps: {e.get('max_steps')}")
            if e.get("recalled"):
                out.append("recalled facts:\n" + _indent("\n".join(e["recalled"])))
        elif kind == "model":
            out.append(f"\n── step {e.get('step')}  ({e.get('prompt_tokens', 0)} prompt + "
                       f"{e.get('completion_tokens', 0)} completion tokens, {e.get('seconds', 0):.2f} s)")
            if show_prompts:
                for m in e.get("prompt", []):
                    out.append(_indent(f"[{m.get('role')}] {m.get('content') or ''}", "  │ "))
            if e.get("output"):
                out.append(_indent(e["output"], "  "))
            for c in e.get("tool_calls", []):
                f = c.get("function", c)
                out.append(f"  → {f.get('name')}({f.get('arguments')})")
        elif kind == "tool":
            mark = "✗" if e.get("error") else "←"
            out.append(f"  {mark} {e.get('name')}: ({e.get('seconds', 0):.2f} s)")
            out.append(_indent(e.get("observation", ""), "      "))
        elif kind == "memory":
            out.append(f"  [memory] {e.get('kind')}: {e.get('text', '')}")
        elif kind == "end":
            out.append(f"\nanswer: {e.get('answer')}")
            out.append(f"stopped: {e.get('stopped')} after {e.get('steps')} steps, "
                       f"{e.get('prompt_tokens', 0)} prompt + {e.get('completion_tokens', 0)} completion tokens, "
                       f"{e.get('seconds', 0):.2f} s")
    return "\n".join(out)
