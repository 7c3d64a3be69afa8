"""The agent runtime: tools from type hints, built-in tools (real sandbox, real files), a real MCP server
process, the native and ReAct loops, memory, traces and the CLI.

The loop tests drive the agent with a scripted policy (a fixed list of replies standing in for a trained
model: the loop, the tools and the trace are what is under test); tool results are checked against
hand-computed values. Local-model and endpoint tests use a real tiny model and a real `llmkit serve`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import openai
import pytest
from test_serve_fixtures import build_tokenizer, running_server

import llmkit
from llmkit.agent import Agent, LongTermMemory, ShortTermMemory, Tool, ToolRegistry, format_trace, read_trace, tool
from llmkit.agent.builtin import builtin_tools, calculate, calculator, file_tools, python_tool
from llmkit.agent.llm import Reply
from llmkit.agent.react import parse_react
from llmkit.cli import main as cli
from llmkit.errors import InputError, LlmkitError
from llmkit.sandbox import SandboxLimits


class Scripted:
    """A stand-in model: returns the given replies in order and records every prompt it was sent."""

    def __init__(self, replies: list[Reply | str]):
        self.replies = [r if isinstance(r, Reply) else Reply(r) for r in replies]
        self.prompts: list[list[dict]] = []
        self.tools: list = []

    def chat(self, messages, tools=None, stop=None, max_tokens=None) -> Reply:
        self.prompts.append(json.loads(json.dumps(messages)))
        self.tools.append(tools)
        return self.replies.pop(0)

    def count_tokens(self, messages, tools=None) -> int:
        return sum(len(m.get("content") or "") for m in messages) // 4

    def describe(self) -> dict:
        return {"kind": "scripted", "model": "scripted"}


def call(name: str, **args) -> dict:
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


# ---------------------------------------------------------------------------- tools


def test_schema_comes_from_type_hints_and_docstring():
    @llmkit.agent.tool
    def convert(amount: float, unit: str = "km", exact: bool = False, tags: list[str] | None = None) -> str:
        """Convert a distance.

        Args:
            amount: how far
            unit: the target unit
        """
        return f"{amount} {unit}"

    assert isinstance(convert, Tool)
    assert convert.schema == {"type": "function", "function": {
        "name": "convert", "description": "Convert a distance.",
        "parameters": {"type": "object", "required": ["amount"], "properties": {
            "amount": {"type": "number", "description": "how far"},
            "unit": {"type": "string", "default": "km", "description": "the target unit"},
            "exact": {"type": "boolean", "default": False},
            "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}], "default": None},
        }}}}
    reg = ToolRegistry([convert])
    assert reg.run("convert", {"amount": 3}).text == "3.0 km"
    assert reg.run("convert", '{"amount": 2.5, "unit": "mi"}').text == "2.5 mi"
    for bad in ({"unit": "m"}, {"amount": "far"}, "{not json", "[1, 2]"):
        obs = reg.run("convert", bad)
        assert obs.error and obs.text.startswith("Error:")
    assert "amount" in reg.run("convert", {}).text  # says which argument is missing
    missing = reg.run("nope", {})
    assert missing.error and "convert" in missing.text  # lists the tools there are


def test_bad_tool_definitions_are_clear_errors():
    def no_hints(x):
        return x

    def star(*xs: int) -> int:
        return 0

    for fn, words in ((no_hints, "type hint"), (star, "*args")):
        with pytest.raises(InputError, match=words.replace("*", r"\*")):
            tool(fn)
    with pytest.raises(InputError, match="unique"):
        ToolRegistry([calculator, calculator])
    with pytest.raises(InputError, match="unknown tool 'shell'"):
        builtin_tools("calculator,shell")
    with pytest.raises(LlmkitError, match="workspace"):
        builtin_tools("read_file")


def test_exceptions_and_timeouts_become_error_observations():
    @tool(timeout=0.2)
    def slow(seconds: float) -> str:
        """Sleep."""
        time.sleep(seconds)
        return "done"

    @tool
    def broken(x: int) -> int:
        """Divide by zero."""
        return x // 0

    t0 = time.monotonic()
    obs = slow.run({"seconds": 5})
    assert obs.error and "timed out after 0.2 s" in obs.text and time.monotonic() - t0 < 2
    assert slow.run({"seconds": 0}).text == "done"
    obs = broken.run({"x": 1})
    assert obs.error and "ZeroDivisionError" in obs.text


def test_calculator_matches_hand_computed_values_and_refuses_code():
    assert calculate("1234 * 5678") == 7006652
    assert calculate("(4374 + 25) * 96 - 998") == 421306
    assert calculate("(17 + 5) / 4") == 5.5
    assert calculate("2 ** 10 - 7 // 2 + 7 % 3") == 1022
    assert calculate("-3 + sqrt(16)") == 1
    assert calculator.run({"expression": "12 * 12"}).text == "144"
    for bad in ("__import__('os').system('true')", "().__class__", "x + 1", "2 ** 100000", "1 / 0", "", "[1] * 3"):
        with pytest.raises(InputError):
            calculate(bad)
        assert calculator.run({"expression": bad}).error


def test_python_tool_runs_in_the_sandbox():
    py = python_tool(SandboxLimits(timeout=3, cpu_seconds=3, memory_mb=256), max_chars=50)
    assert py.run({"code": "print(sum(i * i for i in range(10)))"}).text == "285"
    out = py.run({"code": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)"}).text
    assert "Error" in out or "OSError" in out or "exit status" in out  # no network in the sandbox
    assert "[truncated" in py.run({"code": "print('x' * 500)"}).text
    slow = py.run({"code": "while True: pass"})
    assert "timed out" in slow.text or "exit status" in slow.text


def test_file_tools_stay_in_the_workspace(tmp_path):
    ws = tmp_path / "ws"
    read, write = file_tools(ws)
    assert write.run({"path": "notes/a.txt", "content": "héllo"}).text == "wrote 6 bytes to notes/a.txt"
    assert (ws / "notes" / "a.txt").read_text() == "héllo"
    assert read.run({"path": "notes/a.txt"}).text == "héllo"
    (tmp_path / "secret.txt").write_text("no")
    (ws / "link").symlink_to(tmp_path / "secret.txt")
    for path in ("../secret.txt", str(tmp_path / "secret.txt"), "link"):
        obs = read.run({"path": path})
        assert obs.error and "outside the workspace" in obs.text
    assert write.run({"path": "../x.txt", "content": "x"}).error and not (tmp_path / "x.txt").exists()
    missing = read.run({"path": "nope.txt"})
    assert missing.error and "notes/a.txt" in missing.text


# ---------------------------------------------------------------------------- loops and traces


def test_native_loop_runs_tools_and_traces_every_step(tmp_path):
    model = Scripted([
        Reply("", [call("calculator", expression="4821 * 397"), call("calculator", expression="2 +")]),
        Reply("", [call("nope")]),
        "It is 1913937.",
    ])
    trace = tmp_path / "t.jsonl"
    res = Agent(model, tools=["calculator"], trace=trace).run("What is 4821 * 397?")
    assert res.answer == "It is 1913937." and res.stopped == "answer" and res.steps == 3 and res.tool_calls == 3
    second = model.prompts[1]  # the results went back as tool messages, paired by call id
    assert second[-3]["tool_calls"][0]["function"]["name"] == "calculator"
    assert second[-2] == {"role": "tool", "tool_call_id": "call_calculator", "name": "calculator",
                          "content": "1913937"}
    assert second[-1]["content"].startswith("Error:")  # a bad expression is an observation, not a crash
    assert model.tools[0][0]["function"]["name"] == "calculator"
    events = read_trace(trace)
    assert [e["event"] for e in events] == ["start", "model", "tool", "tool", "model", "tool", "model", "end"]
    assert events[2]["observation"] == "1913937" and not events[2]["error"] and events[3]["error"]
    assert events[1]["prompt"][-1] == {"role": "user", "content": "What is 4821 * 397?"}
    text = format_trace(trace)
    assert "calculator" in text and "1913937" in text and "answer: It is 1913937." in text


def test_react_loop_and_max_steps(tmp_path):
    model = Scripted([
        "Thought: multiply\nAction: calculator\nAction Input: {\"expression\": \"123 * 456\"}",
        "Thought: try the bare form\nAction: calculator\nAction Input: 56088 + 1",
        "I am confused",
        "Thought: I know it\nFinal Answer: 56089",
    ])
    res = Agent(model, tools=["calculator"], loop="react").run("What is 123 * 456 + 1?")
    assert res.answer == "56089" and res.steps == 4
    system = model.prompts[0][0]
    assert system["role"] == "system" and "calculator(expression: string)" in system["content"]
    assert model.prompts[1][-1] == {"role": "user", "content": "Observation: 56088"}
    assert model.prompts[2][-1] == {"role": "user", "content": "Observation: 56089"}
    assert "Follow the format" in model.prompts[3][-1]["content"]
    looping = Scripted([Reply("", [call("calculator", expression="1 + 1")])] * 3)
    res = Agent(looping, tools=["calculator"], max_steps=3).run("loop")
    assert res.answer is None and res.stopped == "max_steps" and res.steps == 3 and res.tool_calls == 3
    step = parse_react('Thought: x\nAction: python\nAction Input: ```json\n{"code": "print(1)"}\n```', {})
    assert step.action == "python" and step.arguments == {"code": "print(1)"}
    for bad in ({"max_steps": 0}, {"loop": "plan"}, {"tool_timeout": 0}):
        with pytest.raises(InputError):
            Agent(Scripted([]), **bad)
    with pytest.raises(InputError, match="non-empty task"):
        Agent(Scripted([])).run("  ")


def test_short_term_memory_summarises_old_turns():
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "task"}]
    for i in range(4):
        msgs += [{"role": "assistant", "content": None, "tool_calls": [call("calculator", expression=f"{i}+1")]},
                 {"role": "tool", "tool_call_id": "c", "content": str(i + 1)}]
    seen = []
    mem = ShortTermMemory(budget=5, keep_last=3)
    out = mem.fit(msgs, len, lambda text, n: seen.append(text) or "did 0+1 .. 2+1")
    # kept: system, task, summary, then the last 3 messages moved back to a call + its result (4 messages)
    assert [m["role"] for m in out] == ["system", "user", "user", "assistant", "tool", "assistant", "tool"]
    assert out[2]["content"].startswith("[Summary of the earlier steps] did 0+1")
    assert "calculator" in seen[0] and "tool: 2" in seen[0] and "tool: 3" not in seen[0]
    assert mem.fit(msgs[:4], lambda m: 1, None) == msgs[:4]  # within budget: untouched


def test_long_term_memory_recalls_and_persists(tmp_path):
    mem = LongTermMemory(tmp_path / "mem")
    for fact in ("The capital of France is Paris.", "Alice's favourite number is 42.", "Water boils at 100 C."):
        mem.add(fact)
    mem.add("Water boils at 100 C.")
    assert len(mem) == 3
    assert mem.search("what number does alice like", 1)[0][0] == "Alice's favourite number is 42."
    again = LongTermMemory(tmp_path / "mem")  # reloaded from the folder
    assert again.facts == mem.facts and again.search("capital city of France", 1)[0][0].startswith("The capital")
    model = Scripted(["Her number is 42."])
    res = Agent(model, tools=["remember", "recall"], memory=again).run("What is Alice's favourite number?")
    assert "Alice's favourite number is 42." in model.prompts[0][0]["content"]  # recalled into the system turn
    assert {t["function"]["name"] for t in model.tools[0]} == {"remember", "recall"}
    assert res.trace[0]["recalled"][0] == "Alice's favourite number is 42."
    assert "What is Alice's favourite number? -> Her number is 42." in LongTermMemory(tmp_path / "mem").facts
    with pytest.raises(InputError, match="embedded with"):
        LongTermMemory(tmp_path / "mem", embed=lambda texts: [[1.0, 0.0]] * len(texts))


# ---------------------------------------------------------------------------- MCP

MCP_SERVER = '''
try:
    from mcp.server.mcpserver import MCPServer as Server
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as Server
app = Server("arith")

@app.tool()
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b

@app.tool()
def fail(message: str) -> str:
    """Always fails."""
    raise ValueError(message)

app.run()
'''


def test_mcp_server_tools(tmp_path):
    from llmkit.agent.mcp import MCPTools

    script = tmp_path / "server.py"
    script.write_text(MCP_SERVER)
    with MCPTools(f"{sys.executable} {script}") as server:
        tools = {t.name: t for t in server.tools}
        assert set(tools) == {"multiply", "fail"}
        assert tools["multiply"].parameters["required"] == ["a", "b"]
        assert tools["multiply"].description == "Multiply two integers."
        model = Scripted([Reply("", [call("multiply", a=4821, b=397), call("fail", message="boom")]), "1913937"])
        res = Agent(model, tools=["calculator", *server.tools]).run("4821 * 397?")
        assert res.answer == "1913937"
        assert model.prompts[1][-2]["content"] == "1913937"  # computed by the server process
        assert model.prompts[1][-1]["content"].startswith("Error:")
        assert len(model.tools[0]) == 3
    with pytest.raises(InputError, match="MCP server"):
        MCPTools(f"{sys.executable} -c 'import sys; sys.exit(3)'", timeout=20)


# ---------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random-init llmkit Llama (2 layers, dim 64, context 1024) + ChatML BPE tokenizer."""
    import torch

    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer

    out = tmp_path_factory.mktemp("agent") / "tiny"
    tok = build_tokenizer(out)
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=64, intermediate_size=128, block_size=1024, eos_token_id=0)
    Transformer(cfg).save_pretrained(out)
    return out


def test_local_model_in_both_loops(tiny_dir, tmp_path):
    model, tok = llmkit.load_model(tiny_dir), llmkit.load_tokenizer(tiny_dir)
    native = Agent(model, tools=["calculator"], tokenizer=tok, max_steps=2, max_tokens=8)
    assert native.loop == "native"  # ChatML: llmkit's default tool format
    res = native.run("What is 2 + 2?", trace=tmp_path / "n.jsonl")
    model_events = [e for e in res.trace if e["event"] == "model"]
    assert model_events[0]["prompt_tokens"] > 100  # the tool list is in the rendered prompt
    assert model_events[0]["completion_tokens"] <= 8
    react = Agent(model, tools=["calculator"], tokenizer=tok, loop="react", max_steps=2, max_tokens=8)
    res = react.run("What is 2 + 2?")
    assert res.stopped == "max_steps" and res.steps == 2  # a random model never answers, and nothing crashes


def test_endpoint_mode_against_llmkit_serve(tiny_dir):
    with running_server(tiny_dir, max_tokens=64) as srv:
        url = srv.url + "/v1"
        res = Agent(url, tools=["calculator"], max_tokens=12).run("Say hello")
        direct = openai.OpenAI(base_url=url, api_key="x").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Say hello"}], tools=[calculator.schema],
            max_tokens=12, temperature=0, seed=0)
        assert not direct.choices[0].message.tool_calls  # a random model does not call tools by itself
        assert res.answer == (direct.choices[0].message.content or "").strip() and res.steps == 1
        assert res.prompt_tokens == direct.usage.prompt_tokens


def test_cli_run_and_trace(tiny_dir, tmp_path, capsys):
    trace = tmp_path / "run.jsonl"
    rc = cli(["agent", "run", "What is 2 + 2?", "--model", str(tiny_dir), "--loop", "react", "--max-steps", "1",
              "--max-tokens", "4", "--trace", str(trace), "--json"])
    assert rc == 1  # no answer within one step
    out = json.loads(capsys.readouterr().out)
    assert out["stopped"] == "max_steps" and out["steps"] == 1
    assert cli(["agent", "trace", str(trace)]) == 0
    assert "task: What is 2 + 2?" in capsys.readouterr().out
    assert cli(["agent", "run", "x", "--model", str(tiny_dir), "--tools", "calculator,shell"]) == 2
    assert "unknown tool 'shell'" in capsys.readouterr().err
    assert cli(["agent", "trace", str(tmp_path / "missing.jsonl")]) == 2
    assert cli(["agent", "run", "x", "--model", str(tmp_path / "nowhere")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    Path(tmp_path / "bad.jsonl").write_text("{}\n")
    assert cli(["agent", "trace", str(tmp_path / "bad.jsonl")]) == 2


def test_long_term_memory_in_a_rag_store(tmp_path):
    from llmkit.rag.memory import StoreMemory

    mem = StoreMemory(tmp_path / "store")
    assert len(mem) == 0 and mem.search("anything") == []
    for fact in ("The capital of France is Paris.", "Alice's favourite number is 42.") * 2:
        mem.add(fact)
    assert len(mem) == 2
    model = Scripted(["42"])
    Agent(model, memory=mem, recall_k=1).run("Which number does Alice like best?")
    assert model.prompts[0][0]["content"].endswith("- Alice's favourite number is 42.")
    assert len(mem) == 3  # the answer was stored
    mem.close()


def _agent_task():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "agent_task.py"
    spec = importlib.util.spec_from_file_location("agent_task", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_agent_task_data(tmp_path):
    """The demo's data: answers are the arithmetic's value (Python's, hand-independent of the calculator),
    held-out expressions never occur in training; copytext lines hold their span 3-4 times."""
    task = _agent_task()
    train, val = task.make(str(tmp_path / "calc"), n_train=60, n_val=20, seed=3, per_chat=1)
    recs = {p: [json.loads(line) for line in p.read_text().splitlines()] for p in (train, val)}
    exprs = {p: [json.loads(r["messages"][1]["tool_calls"][0]["function"]["arguments"])["expression"]
                 for r in recs[p]] for p in (train, val)}
    assert len(recs[train]) == 60 and len(recs[val]) == 20 and not set(exprs[train]) & set(exprs[val])
    for r, expr in zip(recs[val], exprs[val]):
        assert r["messages"][0]["content"] == f"What is {expr}?"
        assert r["messages"][2]["content"] == r["messages"][3]["content"] == str(eval(expr))
    lines = task.copy_text(str(tmp_path / "copy.txt"), n_lines=50, seed=1).read_text().splitlines()
    assert len(lines) == 50
    for line in lines:  # span + (filler + span) x 2-3: the line starts and ends with its span
        k = max(k for k in range(1, len(line) // 3 + 1) if line.startswith(line[-k:]))
        assert line.count(line[:k]) >= 3, line
