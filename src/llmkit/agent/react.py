"""ReAct text (Yao et al., 2022) for models without a tool template: Thought / Action / Action Input /
Observation, ended by `Final Answer:`. The model writes up to `Observation:` (a stop string); the agent
runs the action and writes the observation back as the next user turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

REACT_INSTRUCTIONS = """Answer the question as well as you can. You can use these tools:
{tools}

Use exactly this format:
Thought: what to do next
Action: one tool name from [{names}]
Action Input: the tool's arguments as a JSON object
Observation: the tool's result (written for you; stop after Action Input)
... (Thought / Action / Action Input / Observation can repeat)
Thought: I know the answer
Final Answer: the answer to the question"""

STOP = ["\nObservation:", "Observation:"]

_FINAL = re.compile(r"Final Answer\s*:\s*(.*)", re.S | re.I)
_ACTION = re.compile(r"Action\s*:\s*[`\"']?([\w\-.]+)[`\"']?\s*(?:\n|$)\s*(?:Action Input\s*:\s*(.*))?", re.S | re.I)


@dataclass
class ReActStep:
    """What one ReAct turn asks for: a tool call (`action`, `arguments`) or a `final` answer, or neither (`error`)."""

    thought: str
    action: str | None = None
    arguments: Any = None
    final: str | None = None
    error: str | None = None


def react_prompt(task: str, tool_lines: str, names: list[str], system: str | None = None) -> list[dict[str, str]]:
    instructions = REACT_INSTRUCTIONS.format(tools=tool_lines or "(none)", names=", ".join(names))
    if system:
        instructions = system + "\n\n" + instructions
    return [{"role": "system", "content": instructions}, {"role": "user", "content": f"Question: {task}"}]


def _arguments(raw: str, params: dict[str, Any] | None) -> Any:
    """The Action Input as a JSON object; a bare value goes to the tool's only required parameter."""
    raw = raw.strip().strip("`").strip()
    if raw.startswith("json"):
        raw = raw[4:].strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        m = re.match(r"\{.*\}", raw, re.S)  # a JSON object followed by chatter
        value = None
        if m:
            try:
                value = json.loads(m.group(0))
            except json.JSONDecodeError:
                pass
        if value is None:
            value = raw.splitlines()[0].strip().strip('"') if raw else raw
    if isinstance(value, dict):
        return value
    required = (params or {}).get("required") or list((params or {}).get("properties", {}))
    if len(required) == 1:
        return {required[0]: value}
    return value


def parse_react(text: str, tool_params: dict[str, dict[str, Any]]) -> ReActStep:
    """Read one ReAct turn. An action before `Final Answer` wins (the model stopped at Observation)."""
    action = _ACTION.search(text)
    final = _FINAL.search(text)
    thought = text[: action.start() if action else (final.start() if final else len(text))]
    thought = re.sub(r"^\s*Thought\s*:\s*", "", thought.strip(), flags=re.I)
    if action and (final is None or action.start() < final.start()):
        name = action.group(1)
        if action.group(2) is None:
            return ReActStep(thought, action=name, error="missing 'Action Input:' after 'Action:'")
        return ReActStep(thought, action=name, arguments=_arguments(action.group(2), tool_params.get(name)))
    if final:
        return ReActStep(thought, final=final.group(1).strip())
    return ReActStep(thought, error="no 'Action:' + 'Action Input:' and no 'Final Answer:'")
