"""`Agent(model_or_url, tools=[...]).run(task)`: the tool-using loop.

Two loops over the same tools, step limit, per-tool timeout, memory and trace:
- `native`: function calling. The model gets the tools' JSON schemas (rendered by its chat template, or
  sent as the API's `tools`), answers with `tool_calls`; each result goes back as a `tool` message.
- `react`: ReAct text (Thought / Action / Action Input / Observation / Final Answer) for models without
  a tool template.
`loop="auto"` picks `native` for endpoints and for local models whose template renders tools or that were
trained on llmkit's default (hermes) format, else `react` (see `choose_loop`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.agent.llm import chat_model
from llmkit.agent.memory import LongTermMemory, ShortTermMemory
from llmkit.agent.react import STOP, parse_react, react_prompt
from llmkit.agent.tools import Tool, ToolRegistry, format_result
from llmkit.agent.trace import TraceWriter
from llmkit.errors import InputError

LOOPS = ("auto", "native", "react")


@dataclass
class AgentResult:
    """The answer (None when the step limit came first), why the loop stopped, and the conversation."""

    answer: str | None
    stopped: str  # "answer" | "max_steps"
    steps: int
    messages: list[dict[str, Any]]
    tool_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    trace: list[dict[str, Any]] = field(default_factory=list, repr=False)


def choose_loop(llm: Any) -> str:
    """`native` for endpoints and models whose chat template renders tools (or that were fine-tuned on the
    default hermes format: their template is ChatML and the tools go in the system turn), else `react`."""
    return "native" if getattr(llm, "native_tools", True) else "react"


class Agent:
    """A tool-using agent over a model folder / loaded model or an OpenAI-compatible URL.

    `tools`: `Tool`s, plain functions (turned into tools from their type hints and docstrings) or names of
    built-in tools (`calculator`, `python`, `read_file`, `write_file`, `rag`, `remember`, `recall`).
    `max_steps` bounds the model calls; `tool_timeout` (seconds) each tool call. `context_budget` (tokens)
    turns on short-term memory (old turns summarised by the model); `memory` (a `LongTermMemory` or a
    folder) recalls stored facts into the system message and stores each final answer. `trace` is a JSONL path.
    """

    def __init__(self, model_or_url: Any, tools: list[Any] | tuple[Any, ...] = (), *, tokenizer: Any = None,
                 loop: str = "auto", max_steps: int = 8, tool_timeout: float = 30.0, system: str | None = None,
                 trace: str | Path | None = None, context_budget: int | None = None,
                 memory: LongTermMemory | str | Path | None = None, recall_k: int = 3, workspace: str | None = None,
                 max_tokens: int = 256, temperature: float = 0.0, served_model: str | None = None,
                 api_key: str | None = None):
        if loop not in LOOPS:
            raise InputError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
        if max_steps < 1:
            raise InputError(f"max_steps must be at least 1, got {max_steps}")
        if tool_timeout <= 0:
            raise InputError(f"tool_timeout must be positive seconds, got {tool_timeout}")
        self.memory = LongTermMemory(memory) if isinstance(memory, str | Path) else memory
        from llmkit.agent.builtin import builtin_tools

        resolved: list[Tool | Any] = []
        for t in tools:
            resolved += builtin_tools([t], workspace=workspace, memory=self.memory) if isinstance(t, str) else [t]
        self.registry = ToolRegistry(resolved, timeout=tool_timeout)
        kw: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        if isinstance(model_or_url, str) and model_or_url.startswith(("http://", "https://")):
            kw.update(model=served_model, api_key=api_key)
        self.llm = chat_model(model_or_url, tokenizer, **kw)
        self.loop = choose_loop(self.llm) if loop == "auto" else loop
        self.max_steps, self.system, self.trace_path, self.recall_k = max_steps, system, trace, recall_k
        self.short_term = ShortTermMemory(context_budget) if context_budget else None

    # ---- helpers ----------------------------------------------------------------------------------
    def _summarize(self, text: str, max_tokens: int) -> str:
        prompt = ("Summarise these earlier steps of a task in a few sentences. Keep every number, name, tool "
                  "result and conclusion.\n\n" + text)
        return self.llm.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens).content

    def _fit(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
             trace: TraceWriter) -> list[dict[str, Any]]:
        if self.short_term is None:
            return messages
        before = len(messages)
        fitted = self.short_term.fit(messages, lambda m: self.llm.count_tokens(m, tools), self._summarize)
        if len(fitted) != before:
            summary = next(m["content"] for m in fitted if m["content"].startswith("[Summary"))
            trace.write("memory", kind="summary", replaced=before - len(fitted) + 1, text=summary)
        return fitted

    def _system_text(self, task: str, trace_fields: dict[str, Any]) -> str | None:
        parts = [self.system] if self.system else []
        if self.memory is not None and len(self.memory):
            facts = [f for f, _ in self.memory.search(task, self.recall_k)]
            trace_fields["recalled"] = facts
            parts.append("Facts from earlier tasks that may help:\n" + "\n".join(f"- {f}" for f in facts))
        return "\n\n".join(parts) or None

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self, task: str, trace: str | Path | None = None) -> AgentResult:
        """Work on `task` until the model answers or `max_steps` model calls were made."""
        if not isinstance(task, str) or not task.strip():
            raise InputError("the agent needs a non-empty task")
        t0 = time.monotonic()
        tw = TraceWriter(trace if trace is not None else self.trace_path)
        start: dict[str, Any] = {}
        system = self._system_text(task, start)
        schemas = self.registry.schemas or None
        if self.loop == "native":
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": task}]
        else:
            props = {n: t.parameters for n, t in self.registry.tools.items()}
            messages = react_prompt(task, self.registry.describe(), list(props), system)
        tw.write("start", task=task, model=self.llm.describe(), loop=self.loop, max_steps=self.max_steps,
                 tool_names=list(self.registry.tools), tools=schemas or [], **start)
        res = AgentResult(None, "max_steps", 0, messages)
        try:
            for step in range(1, self.max_steps + 1):
                res.steps = step
                messages = self._fit(messages, schemas if self.loop == "native" else None, tw)
                t1 = time.monotonic()
                if self.loop == "native":
                    reply = self.llm.chat(messages, tools=schemas)
                else:
                    reply = self.llm.chat(messages, stop=STOP)
                res.prompt_tokens += reply.prompt_tokens
                res.completion_tokens += reply.completion_tokens
                tw.write("model", step=step, prompt=messages, output=reply.content, tool_calls=reply.tool_calls,
                         prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                         finish_reason=reply.finish_reason, seconds=round(time.monotonic() - t1, 4))
                done = self._native_step(reply, messages, step, tw, res) if self.loop == "native" \
                    else self._react_step(reply, messages, step, tw, res)
                if done:
                    res.stopped = "answer"
                    break
            res.messages = messages
            res.seconds = time.monotonic() - t0
            if self.memory is not None and res.answer:
                self.memory.add(f"{task.strip()} -> {res.answer}")
            tw.write("end", answer=res.answer, stopped=res.stopped, steps=res.steps, tool_calls=res.tool_calls,
                     prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                     seconds=round(res.seconds, 4))
        finally:
            tw.close()
        res.trace = tw.events
        return res

    def _call_tool(self, name: str, arguments: Any, step: int, tw: TraceWriter, res: AgentResult) -> str:
        obs = self.registry.run(name, arguments)
        res.tool_calls += 1
        tw.write("tool", step=step, name=name, arguments=arguments, observation=obs.text, error=obs.error,
                 seconds=round(obs.seconds, 4))
        return obs.text

    def _native_step(self, reply: Any, messages: list[dict[str, Any]], step: int, tw: TraceWriter,
                     res: AgentResult) -> bool:
        if not reply.tool_calls:
            messages.append({"role": "assistant", "content": reply.content})
            res.answer = reply.content.strip()
            return True
        messages.append({"role": "assistant", "content": reply.content or None, "tool_calls": reply.tool_calls})
        for call in reply.tool_calls:
            f = call["function"]
            text = self._call_tool(f["name"], f.get("arguments", "{}"), step, tw, res)
            messages.append({"role": "tool", "tool_call_id": call.get("id"), "name": f["name"], "content": text})
        return False

    def _react_step(self, reply: Any, messages: list[dict[str, Any]], step: int, tw: TraceWriter,
                    res: AgentResult) -> bool:
        text = reply.content.rstrip()
        parsed = parse_react(text, {n: t.parameters for n, t in self.registry.tools.items()})
        messages.append({"role": "assistant", "content": text})
        if parsed.final is not None and parsed.action is None:
            res.answer = parsed.final
            return True
        if parsed.error is not None:
            obs = f"Error: {parsed.error}. Follow the format (Action + Action Input, or Final Answer)."
            tw.write("tool", step=step, name=parsed.action, arguments=None, observation=obs, error=True, seconds=0.0)
        else:
            obs = self._call_tool(parsed.action, parsed.arguments, step, tw, res)
        messages.append({"role": "user", "content": f"Observation: {format_result(obs)}"})
        return False


def run_agent(task: str, model_or_url: Any, tools: list[Any] | tuple[Any, ...] = (), **kw: Any) -> AgentResult:
    """`Agent(model_or_url, tools, **kw).run(task)`."""
    return Agent(model_or_url, tools, **kw).run(task)


def result_json(result: AgentResult) -> str:
    """The result as one JSON object (what `llmkit agent run --json` prints)."""
    return json.dumps({"answer": result.answer, "stopped": result.stopped, "steps": result.steps,
                       "tool_calls": result.tool_calls, "prompt_tokens": result.prompt_tokens,
                       "completion_tokens": result.completion_tokens, "seconds": round(result.seconds, 3)})
