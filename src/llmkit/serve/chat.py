"""`POST /v1/chat/completions`: messages rendered with the model's chat template, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request

from llmkit.errors import InputError
from llmkit.infer.grammar import Grammar, compile_grammar
from llmkit.serve import rag
from llmkit.serve.errors import APIError
from llmkit.serve.protocol import ChatCompletionRequest
from llmkit.serve.sequences import (
    EventStreamResponse,
    SequenceState,
    collect,
    guarded_stream,
    merged_events,
    record,
    submit_all,
)
from llmkit.serve.sse import sse
from llmkit.serve.state import (
    INLINE_CHARS,
    ServerState,
    check_logit_bias,
    new_id,
    off_loop,
    sampling_params,
    text_size,
)
from llmkit.serve.tools import finish_reason, tool_plan
from llmkit.tokenizer.tool_calls import prepare_chat

router = APIRouter()


def render_messages(state: ServerState, body: ChatCompletionRequest, tools: list[dict] | None = None) -> list[int]:
    """Prompt token ids: the conversation (tools, tool calls and tool results included, in the template's
    tool format: tokenizer/tool_calls.prepare_chat) through the chat template, the assistant turn opened.

    Message contents are encoded as plain text (`Tokenizer.encode_chat`): a client cannot forge
    a system turn by typing the template's special tokens.
    """
    messages, extra = prepare_chat([m.as_dict() for m in body.messages], tools, state.tokenizer.chat_template)
    return state.tokenizer.encode_chat(messages, add_generation_prompt=True, **extra)


def _prepare(state: ServerState, body: ChatCompletionRequest) -> tuple[Any, list[int], Grammar | None]:
    """The request's tool plan (None without tools), prompt ids and output grammar."""
    plan = tool_plan(state, body)
    prompt_ids = render_messages(state, body, plan and plan.tools)
    grammar = request_grammar(state, body)  # compiled (a bad schema is a 400) even when tools override it
    return plan, prompt_ids, plan.grammar if plan is not None and plan.grammar is not None else grammar


def _prep_size(body: ChatCompletionRequest) -> int:
    """How much work `_prepare` is: the messages' text; never inline with tools or an output grammar
    (compiling one may take long)."""
    if body.tools or body.response_format is not None or body.guided_choice or body.guided_regex:
        return INLINE_CHARS + 1
    return sum(text_size(m.content) + text_size(m.tool_calls and [c.function.arguments for c in m.tool_calls])
               for m in body.messages)


def _check_response_format(body: ChatCompletionRequest) -> None:
    # OpenAI's rule for JSON mode: the conversation itself must ask for JSON.
    if body.response_format is not None and body.response_format.type == "json_object":
        if not any("json" in m.text().lower() for m in body.messages):
            raise APIError(
                "response_format json_object requires the word 'JSON' in some message "
                "(instruct the model to produce JSON)",
                400,
                param="response_format",
            )


def request_grammar(state: ServerState, body: ChatCompletionRequest) -> Grammar | None:
    """The grammar the output must match (response_format, guided_choice, guided_regex), compiled
    now so a bad schema or regex is a 400 before anything runs."""
    rf = body.response_format
    wanted = [
        g
        for g in (
            Grammar("json_object") if rf is not None and rf.type == "json_object" else None,
            Grammar.json_schema(rf.json_schema.schema_ or {})
            if rf is not None and rf.type == "json_schema" and rf.json_schema is not None
            else None,
            Grammar.choice(body.guided_choice) if body.guided_choice is not None else None,
            Grammar("regex", body.guided_regex) if body.guided_regex is not None else None,
        )
        if g is not None
    ]
    if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
        raise APIError(
            "response_format json_schema requires 'json_schema': {name, schema}", 400, param="response_format"
        )
    if len(wanted) > 1:
        raise APIError("use one of response_format, guided_choice, guided_regex", 400, param="response_format")
    if not wanted:
        return None
    try:
        compile_grammar(state.tokenizer, wanted[0], state.engine.config.vocab_size, state.engine.eos_token_ids)
    except InputError as e:
        raise APIError(str(e), 400, param="response_format") from None
    return wanted[0]


def _logprob_entry(
    state: ServerState, tok: int, lp: float, top: list[tuple[int, float]] | None, top_n: int
) -> dict[str, Any]:
    def item(t: int, v: float) -> dict[str, Any]:
        s = state.token_text(t)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

    return {**item(tok, lp), "top_logprobs": [item(t, v) for t, v in (top or [])[:top_n]]}


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state: ServerState = request.app.state.llmkit
    adapter = state.require_generator(body.model)
    served = adapter or state.model_name
    _check_response_format(body)
    rag_context = await rag.augment(request, body)  # None unless the request asks for retrieval
    extra = {} if rag_context is None else {"rag_context": rag_context}
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs requires logprobs=true", 400, param="top_logprobs")
    check_logit_bias(body, state.tokenizer.vocab_size)
    t_start = time.monotonic()
    n = body.n
    state.admit(n)
    plan, prompt_ids, grammar = await off_loop(_prep_size(body), _prepare, state, body)  # large: off the loop
    parsers = [plan.parser() if plan is not None else None for _ in range(n)]
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = state.check_context(len(prompt_ids), requested)
    top_n = body.top_logprobs or 0
    states = [SequenceState(index=j, prompt_ids=prompt_ids) for j in range(n)]
    jobs = [
        (prompt_ids, replace(sampling_params(body, max_tokens, top_n if body.logprobs else None, j), grammar=grammar))
        for j in range(n)
    ]
    rid, created = new_id("chatcmpl"), int(time.time())
    handles = submit_all(state.engine, jobs, rid, adapter)
    state.metrics.prompt_tokens.inc(len(prompt_ids))
    fingerprint = f"llmkit-{served}"[:64]

    def usage() -> dict[str, int]:
        gen = sum(len(s.token_ids) for s in states)
        return {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": gen,
            "total_tokens": len(prompt_ids) + gen,
        }

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, delta: dict, logprobs: dict | None, finish: str | None) -> dict[str, Any]:
            c = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": served,
                "system_fingerprint": fingerprint,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }
            if include_usage:
                c["usage"] = None
            return c

        async def stream() -> AsyncIterator[str]:
            for s in states:
                yield sse(chunk(s.index, {"role": "assistant", "content": ""}, None, None) | extra)
            async with aclosing(merged_events(handles, request, state.deadline(), state)) as events:
                async for i, ev in events:
                    s = states[i]
                    record(s, ev)
                    lp = None
                    if body.logprobs:
                        lp = {"content": [_logprob_entry(state, ev.token_id, ev.logprob, ev.top_logprobs, top_n)]}
                    parser = parsers[i]
                    if parser is None:
                        if ev.text or lp is not None:
                            yield sse(chunk(i, {"content": ev.text}, lp, None))
                    else:  # content and tool-call deltas, as OpenAI streams them
                        deltas = parser.feed(ev.text) if ev.text else []
                        if ev.finish_reason is not None:
                            deltas += parser.close()
                        if lp is not None and not deltas:
                            deltas = [{}]
                        for d in deltas:
                            yield sse(chunk(i, d, lp, None))
                            lp = None
                    if ev.finish_reason is not None:
                        yield sse(chunk(i, {}, None, finish_reason(ev.finish_reason, parser)))
            if include_usage:
                final = chunk(0, {}, None, None)
                yield sse({**final, "choices": [], "usage": usage()})

        return EventStreamResponse(guarded_stream(stream(), state, states, t_start), handles)

    await collect(handles, request, state, states, t_start)

    choices = []
    for s in states:
        lp = None
        if body.logprobs:
            lp = {
                "content": [
                    _logprob_entry(state, t, v, top, top_n)
                    for t, v, top in zip(s.token_ids, s.logprobs, s.top_logprobs)
                ]
            }
        message: dict[str, Any] = {"role": "assistant", "content": s.text}
        parser = parsers[s.index]
        if parser is not None:
            parser.feed(s.text)
            parser.close()
            message = {"role": "assistant", "content": parser.content}
            if parser.tool_calls:
                message["tool_calls"] = parser.tool_calls
        choices.append(
            {
                "index": s.index,
                "message": message,
                "logprobs": lp,
                "finish_reason": finish_reason(s.finish_reason, parser),
            }
        )
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": served,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": usage(),
        **extra,
    }
