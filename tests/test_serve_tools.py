"""OpenAI tool calling through `llmkit serve` (a random-init tiny model; grammar-forced tool_choice makes
its calls valid): the real `openai` client, streamed and not, tool results sent back, LangChain
`bind_tools`, a LangGraph `create_react_agent` loop, and bad tool requests as 400s."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from test_serve_fixtures import build_tiny_llama, running_server

ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999}, "b": {"type": "integer", "minimum": 0,
                                                                              "maximum": 999}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
ECHO = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 6}},
    "required": ["text"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
    {"type": "function", "function": {"name": "echo", "description": "echo text", "parameters": ECHO}},
]
SCHEMAS = {"add": ADD, "echo": ECHO}
USER = [{"role": "user", "content": "What is 2 + 40?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = build_tiny_llama(tmp_path_factory.mktemp("tools") / "tiny", ctx=2048)  # the tool list is ~700 tokens
    with running_server(tiny, max_tokens=200) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def _check_calls(calls, names) -> None:
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_forced_tool_calls(client):
    """Named and required tool_choice at temperature 1: every reply is valid calls to declared functions."""
    named = {"type": "function", "function": {"name": "echo"}}
    r = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice=named, n=6, seed=1, temperature=1.0, max_tokens=120,
        parallel_tool_calls=False,
    )
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        assert len(ch.message.tool_calls) == 1
        _check_calls(ch.message.tool_calls, {"echo"})
    r = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="required", n=6, seed=2, temperature=1.0,
        max_tokens=150,
    )
    done = [ch for ch in r.choices if ch.finish_reason == "tool_calls"]
    assert len(done) >= 4  # parallel calls allowed: a reply may run long
    for ch in done:
        _check_calls(ch.message.tool_calls, {"add", "echo"})
        assert len({c.id for c in ch.message.tool_calls}) == len(ch.message.tool_calls)


def test_streamed_tool_calls_match_non_streamed(client):
    """Streamed as OpenAI streams: per call first id/name, then argument fragments; same seed, same calls."""
    kw = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", seed=7, temperature=1.0,
              max_tokens=150)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        ch = chunk.choices[0]
        finish = ch.finish_reason or finish
        assert not ch.delta.content
        for d in ch.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                calls[d.index] = {"name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
    assert finish == whole.finish_reason == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls
    ]


def test_auto_parses_calls_and_takes_tool_results(client, server):
    """tool_choice auto parses the model's hermes text into tool_calls (the text forced here with
    guided_regex); the call and its result go back as assistant/tool messages."""
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 40}}\n</tool_call>'
    literal = "".join("\\" + c if c in "{}[]().*+?|^$\\" else c for c in text)  # a regex matching `text`
    r = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, max_tokens=120, extra_body={"guided_regex": literal},
    )
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 2, "b": 40}
    # parallel_tool_calls false: of two written calls only the first is returned
    two = "".join("\\" + c if c in "{}[]().*+?|^$\\" else c for c in text + "\n" + text)
    r = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, max_tokens=200, parallel_tool_calls=False,
        extra_body={"guided_regex": two},
    )
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    # tool_choice none: the same text stays content
    r = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=120,
        extra_body={"guided_regex": literal},
    )
    assert r.choices[0].message.content == text and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    # the call and its result back in the conversation: rendered as llmkit's default (Qwen2.5 hermes) text
    history = USER + [ch.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "42"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=5, seed=0)
    tok = server.state.tokenizer
    from llmkit.tokenizer.tool_calls import prepare_chat

    msgs, extra = prepare_chat(history, TOOLS, tok.chat_template)
    assert "<tool_response>\n42\n</tool_response>" in tok.apply_chat_template(msgs)
    assert r.usage.prompt_tokens == len(tok.encode_chat(msgs, **extra))


def test_bad_tool_requests_are_400(client):
    cases = [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "not in tools"),
        (dict(tool_choice="required"), "needs a non-empty 'tools'"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
         "type 'object'"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "nonsense"}}}}}], tool_choice="required"), "tools"),
        (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "cannot be combined"),
    ]
    for kw, match in cases:
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(model="tiny", messages=USER + [{"role": "user", "content": "json"}], **kw)


def _langchain_tools():
    from langchain_core.tools import tool
    from pydantic import BaseModel, Field

    class AddArgs(BaseModel):  # bounded: a random model would otherwise write digits until max_tokens
        a: int = Field(ge=0, le=999)
        b: int = Field(ge=0, le=999)

    @tool(args_schema=AddArgs)
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    return add


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # create_react_agent (the name) is deprecated
def test_langchain_bind_tools_and_langgraph_loop(server):
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    add = _langchain_tools()
    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="x", model="tiny", max_retries=0, max_tokens=80,
                     temperature=1.0, seed=3)
    msg = llm.bind_tools([add], tool_choice="add").invoke("What is 2 + 40?")
    (call,) = msg.tool_calls
    assert call["name"] == "add" and isinstance(call["args"]["a"], int) and isinstance(call["args"]["b"], int)

    # LangGraph's prebuilt ReAct loop: the random model is steered to call `add` first (tool_choice named),
    # then to answer (tool_choice none); the graph runs the real tool and stops at the answer
    def select(state, runtime):
        called = any(isinstance(m, ToolMessage) for m in state["messages"])
        return llm.bind_tools([add], tool_choice="none" if called else "add")

    agent = create_react_agent(select, [add])
    out = agent.invoke({"messages": [("user", "What is 2 + 40?")]}, {"recursion_limit": 6})
    kinds = [type(m).__name__ for m in out["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    ai, result = out["messages"][1], out["messages"][2]
    args = ai.tool_calls[0]["args"]
    assert result.tool_call_id == ai.tool_calls[0]["id"] and result.content == str(args["a"] + args["b"])
    assert isinstance(out["messages"][3], AIMessage) and not out["messages"][3].tool_calls
