"""Tool-call formats (tokenizer/tool_calls.py): llmkit's default rendering equals Qwen2.5's template as
`transformers` renders it; each format's parser reads back what its formatter writes, streamed in any
chunking, with OpenAI-shaped deltas; text that only looks like a call stays content."""

from __future__ import annotations

import json

import pytest
from test_serve_fixtures import CHATML, build_tokenizer
from transformers import PreTrainedTokenizerFast

from llmkit.errors import InputError
from llmkit.tokenizer import load_tokenizer
from llmkit.tokenizer.tool_calls import (
    FORMATS,
    ToolCallParser,
    detect_format,
    format_tool_calls,
    parse_tool_calls,
    prepare_chat,
    tool_call_schema,
    validate_tools,
)

# Qwen2.5-Instruct's chat template, its tool-calling part (as published in tokenizer_config.json)
QWEN25_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Add two numbers: ä+ö", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "echo", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}},
]
CALLS = [
    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 40}'}},
    {"id": "call_2", "type": "function", "function": {"name": "echo", "arguments": '{"text": "}\\"<tool_call>ü"}'}},
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+40? and echo"},
    {"role": "assistant", "content": "Calling.", "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    {"role": "tool", "tool_call_id": "call_2", "content": "}\"<tool_call>ü"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": None, "tool_calls": CALLS[:1]},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


def test_default_rendering_is_qwen25(tok_dir):
    """Calls and results are rendered as Qwen2.5's template writes them; the tool list in the system turn
    is llmkit's compact one for its own ChatML, Qwen2.5's JSON listing for other plain templates."""
    tmp_path = tok_dir
    ours = load_tokenizer(tmp_path)
    assert ours.chat_template == CHATML
    other_plain = CHATML + "{#- a plain template that is not llmkit's: no tool markup #}"
    msgs, extra = prepare_chat(CHAT, TOOLS, other_plain)
    # transformers renders Qwen2.5's template with arguments as dicts (its documented convention)
    ref = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    hf_chat = [
        {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                             for c in m["tool_calls"]]} if m.get("tool_calls") else m
        for m in CHAT
    ]
    expected = ref.apply_chat_template(hf_chat, tools=TOOLS, chat_template=QWEN25_TOOLS, tokenize=False,
                                       add_generation_prompt=True)
    assert ours.apply_chat_template(msgs, **extra) == expected
    assert ours.encode_chat(msgs, **extra) == ref(expected, add_special_tokens=False)["input_ids"]
    # llmkit's ChatML (models trained here): the same text but a compact tool list, written out by hand
    compact = (
        "You are terse.\n\nTools:\nadd(a: integer, b: integer) - Add two numbers: ä+ö\necho(text: string)\n"
        'Call: <tool_call>{"name": ..., "arguments": {...}}</tool_call>'
    )
    msgs_c, extra_c = prepare_chat(CHAT, TOOLS, ours.chat_template)
    assert extra_c == {} and msgs_c[0] == {"role": "system", "content": compact}
    qwen_system = expected[len("<|im_start|>system\n") : expected.index("<|im_end|>")]
    assert ours.apply_chat_template(msgs_c) == expected.replace(qwen_system, compact)
    assert len(compact) < len(qwen_system) / 2
    # a template that knows tools renders them itself: same text again, through its own markup
    msgs2, extra2 = prepare_chat(CHAT, TOOLS, QWEN25_TOOLS)
    assert extra2 == {"tools": TOOLS}
    assert ours.apply_chat_template(msgs2, chat_template=QWEN25_TOOLS, **extra2) == expected


def _stream(text: str, fmt: str, step: int, max_calls: int | None = None) -> tuple[ToolCallParser, list[dict]]:
    p, events = ToolCallParser(fmt, max_calls), []
    for i in range(0, len(text), step):
        events += p.feed(text[i : i + step])
    return p, events + p.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_streamed(fmt):
    content = None if fmt == "llama3_json" else "Calling."
    text = format_tool_calls(CALLS, fmt, content)
    for step in (1, 2, 7, len(text)):
        p, events = _stream(text, fmt, step)
        assert p.content == content
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in p.tool_calls] == [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in CALLS
        ]
        # OpenAI's streaming shape: per call, first {index, id, type, function{name, arguments: ""}}, then
        # argument fragments that concatenate to the final arguments
        seen: dict[int, dict] = {}
        text_out = ""
        for e in events:
            text_out += e.get("content", "")
            for d in e.get("tool_calls", []):
                if d["index"] not in seen:
                    assert d["id"] and d["type"] == "function" and d["function"]["arguments"] == ""
                    seen[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
                else:
                    assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                    seen[d["index"]]["arguments"] += d["function"]["arguments"]
        assert (text_out or None) == content
        assert [seen[i] for i in sorted(seen)] == [
            {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in p.tool_calls
        ]
    p, events = _stream(text, fmt, 3)
    capped, capped_events = _stream(text, fmt, 3, max_calls=1)
    assert [c["function"] for c in capped.tool_calls] == [p.tool_calls[0]["function"]]
    assert {d["index"] for e in capped_events for d in e.get("tool_calls", [])} == {0}
    ids = [c["id"] for c in parse_tool_calls(text, fmt)[1]]
    assert len(set(ids)) == 2 and all(len(i) == 9 and i.isalnum() for i in ids) == (fmt == "mistral")


def test_not_a_call_stays_content():
    assert parse_tool_calls("so <tool_call>\n{not json}\n</tool_call> ok") == (
        "so <tool_call>\n{not json}\n</tool_call> ok", [])
    assert parse_tool_calls("a < b and <tool") == ("a < b and <tool", [])
    assert parse_tool_calls("plain text", "llama3_json") == ("plain text", [])
    assert parse_tool_calls("[1, 2]", "mistral") == ("[1, 2]", [])
    # property order name-after-arguments still parses (sent whole once complete)
    _, calls = parse_tool_calls('<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call>')
    assert calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    # cut off inside the arguments (finish_reason "length"): the call keeps what was generated
    _, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1')
    assert calls[0]["function"] == {"name": "f", "arguments": '{"x": 1'}
    _, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_c')
    assert calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    # cut off before the name is complete (or with no name at all): the text, as content; this used to
    # loop forever in close(), text <-> call (a served request hung on it)
    for cut in ('<tool_call>\n{"na', "<tool_call>\n{", '<tool_call>\n{ "x": [1,'):
        assert parse_tool_calls("hi " + cut) == ("hi " + cut, [])


def test_detect_and_validate():
    assert detect_format(None) == detect_format(CHATML) == detect_format(QWEN25_TOOLS) == "hermes"
    assert detect_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_format("<|start_header_id|>ipython<|end_header_id|> <|python_tag|>") == "llama3_json"
    validate_tools(TOOLS)
    for bad, match in [
        ([], "non-empty list"),
        ([{"type": "function"}], r"tools\[0\]"),
        ([{"type": "function", "function": {"name": "no spaces"}}], "name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "type 'object'"),
        (TOOLS + TOOLS[:1], "duplicate"),
    ]:
        with pytest.raises(InputError, match=match):
            validate_tools(bad)
    one = tool_call_schema(TOOLS, ["echo"])
    assert one["properties"]["name"] == {"const": "echo"}
    assert len(tool_call_schema(TOOLS)["anyOf"]) == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_forcing_grammar_accepts_the_format(fmt, tok_dir):
    """The grammar that forces calls (infer/grammar.py) accepts exactly what format_tool_calls writes for a
    valid call (parallel: two calls), and refuses a call to an undeclared function."""
    import xgrammar as xgr

    from llmkit.infer.grammar import Grammar, compile_grammar

    tok = load_tokenizer(tok_dir)
    calls = [{"function": {"name": "add", "arguments": {"a": 2, "b": 40}}},
             {"function": {"name": "echo", "arguments": {"text": "hi"}}}]
    schema = tool_call_schema(TOOLS, None, fmt)
    for parallel, n in ((True, 2), (False, 1)):
        compiled = compile_grammar(tok, Grammar.tool_call(fmt, schema, parallel), tok.vocab_size, tok.eos_token_ids)
        text = format_tool_calls(calls[:n], fmt)
        if fmt == "mistral":
            text = text.removeprefix("[TOOL_CALLS]")  # a special token: the grammar starts at the list
        m = xgr.GrammarMatcher(compiled)
        assert all(m.accept_token(t) for t in tok.encode(text, add_special_tokens=False)), text
        assert m.accept_token(tok.eos_token_id) and m.is_terminated()
        assert parse_tool_calls(text, fmt)[1][0]["function"]["name"] == "add"
    bad = xgr.GrammarMatcher(compiled)
    wrong = format_tool_calls([{"function": {"name": "mul", "arguments": {"a": 1}}}], fmt).removeprefix("[TOOL_CALLS]")
    assert not all(bad.accept_token(t) for t in tok.encode(wrong, add_special_tokens=False))


def test_template_that_checks_call_ids(tok_dir):
    """Mistral's templates raise unless tool_call_id is 9 alphanumerics: ids pass through encode_chat as they
    are (not swapped for the span markers), and the native path hands the template tools and dict arguments."""
    tpl = (
        "{% for m in messages %}{% if m.role == 'tool' %}"
        "{% if m.tool_call_id|length != 9 %}{{ raise_exception('Tool call IDs should be 9 characters') }}{% endif %}"
        "[TOOL_RESULTS]{{ {'content': m.content, 'call_id': m.tool_call_id}|tojson }}[/TOOL_RESULTS]"
        "{% elif m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls|map(attribute='function')|list|tojson }}</s>"
        "{% else %}{% if loop.last and tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}"
        "[INST]{{ m.content }}[/INST]{% endif %}{% endfor %}"
    )
    tok = load_tokenizer(tok_dir)
    assert detect_format(tpl) == "mistral"
    call = {"id": "a1B2c3D4e", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    chat = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "3"}, {"role": "user", "content": "ok?"}]
    msgs, extra = prepare_chat(chat, TOOLS[:1], tpl)
    text = tok.apply_chat_template(msgs, chat_template=tpl, **extra)
    assert '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]' in text
    assert '"call_id": "a1B2c3D4e"' in text and "[AVAILABLE_TOOLS]" in text
    assert tok.decode(tok.encode_chat(msgs, chat_template=tpl, **extra)) == text
