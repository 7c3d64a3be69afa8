"""Agents: a tool-using loop (native function calling or ReAct text) over a local model or an
OpenAI-compatible endpoint, with built-in and MCP tools, memory, step limits and JSONL traces (docs/agents.md).

    import llmkit

    @llmkit.agent.tool
    def add(a: int, b: int) -> int:
        '''Add two integers.'''
        return a + b

    result = llmkit.agent.Agent("out/model", tools=[add, "calculator"]).run("What is 12 * 34?")
"""

from __future__ import annotations

import importlib
from typing import Any

from llmkit.agent.tools import Observation, Tool, ToolRegistry, tool

_LAZY = {
    "Agent": "llmkit.agent.agent",
    "AgentResult": "llmkit.agent.agent",
    "run_agent": "llmkit.agent.agent",
    "builtin_tools": "llmkit.agent.builtin",
    "calculator": "llmkit.agent.builtin",
    "calculate": "llmkit.agent.builtin",
    "python_tool": "llmkit.agent.builtin",
    "file_tools": "llmkit.agent.builtin",
    "rag_tool": "llmkit.agent.builtin",
    "MCPTools": "llmkit.agent.mcp",
    "LongTermMemory": "llmkit.agent.memory",
    "ShortTermMemory": "llmkit.agent.memory",
    "LocalChat": "llmkit.agent.llm",
    "RemoteChat": "llmkit.agent.llm",
    "format_trace": "llmkit.agent.trace",
    "read_trace": "llmkit.agent.trace",
}

__all__ = ["Observation", "Tool", "ToolRegistry", "tool", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmkit.agent' has no attribute {name!r}")
