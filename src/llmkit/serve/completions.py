"""`POST /v1/completions`: legacy completions, including lm-evaluation-harness's log-likelihood contract.

Prompts may be a string, a list of strings, a list of token ids or a list of lists of ids; each
prompt gets `n` choices with `index = prompt_position * n + j`. Token-id prompts are used as
received (no BOS added). With `echo` and `logprobs`, every prompt token is scored (index 0 has no
prefix: null), followed by the generated tokens; `max_tokens=0` scores the prompt alone.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from llmkit.serve.errors import APIError
from llmkit.serve.protocol import CompletionRequest
from llmkit.serve.sequences import (
    EventStreamResponse,
    SequenceState,
    collect,
    collect_scores,
    guarded_stream,
    merged_events,
    record,
    submit_all,
    submit_scoring_all,
)
from llmkit.serve.sse import sse
from llmkit.serve.state import (
    ServerState,
    check_logit_bias,
    check_token_ids,
    new_id,
    off_loop,
    sampling_params,
    text_size,
)

router = APIRouter()


def normalize_prompts(state: ServerState, prompt: Any) -> tuple[list[list[int]], list[str | None]]:
    """Token ids of every prompt, plus its text when it came as text (None for id prompts)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError("prompt is empty: expected a string, a list of strings or token ids", 400, param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(state.encode_prompt(p, add_special_tokens=True))
            texts.append(p)
        else:
            check_token_ids(p, state.tokenizer.vocab_size)
            ids.append(list(p))
            texts.append(None)
    return ids, texts


def _top_dict(
    state: ServerState,
    top: list[tuple[int, float]] | None,
    chosen: int,
    chosen_lp: float,
) -> dict[str, float]:
    """OpenAI's legacy top_logprobs entry: the top-N alternatives plus the chosen token."""
    d = {state.token_text(t): lp for t, lp in (top or [])}
    d.setdefault(state.token_text(chosen), chosen_lp)
    return d


class _LegacyLogprobs:
    """Builds the `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, offset: int = 0):
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.offset = offset

    def add(self, text: str, lp: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(lp)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def _echo_logprobs(
    state: ServerState, ids: list[int], scored: list[tuple[float | None, list | None]], top_n: int
) -> _LegacyLogprobs:
    lp = _LegacyLogprobs()
    for i, (tok, (chosen_lp, top)) in enumerate(zip(ids, scored)):
        if i == 0 or chosen_lp is None:
            lp.add(state.token_text(tok), None, None)
        else:
            lp.add(state.token_text(tok), chosen_lp, _top_dict(state, (top or [])[:top_n], tok, chosen_lp))
    return lp


def _add_generated(state: ServerState, lp: _LegacyLogprobs, s: SequenceState, start: int, top_n: int) -> None:
    for tok, chosen_lp, top in zip(s.token_ids[start:], s.logprobs[start:], s.top_logprobs[start:]):
        lp.add(state.token_text(tok), chosen_lp, _top_dict(state, (top or [])[:top_n], tok, chosen_lp))


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    state: ServerState = request.app.state.llmkit
    adapter = state.require_generator(body.model)
    served = adapter or state.model_name
    if body.best_of is not None and body.best_of != body.n:
        raise APIError("best_of is not supported (only best_of == n)", 400, param="best_of")
    if body.suffix:
        raise APIError("suffix (insertion) is not supported by this model", 400, param="suffix")
    t_start = time.monotonic()
    check_logit_bias(body, state.tokenizer.vocab_size)
    p = body.prompt
    n_prompts = len(p) if isinstance(p, list) and p and not isinstance(p[0], int) else 1
    echo_only = body.echo and body.max_tokens == 0
    if not echo_only:  # admitted before tokenizing: a request that can never run costs nothing
        state.admit(n_prompts * body.n, param="n" if body.n > 1 else "prompt")
    prompt_ids, prompt_texts = await off_loop(text_size(p), normalize_prompts, state, p)  # large: off the loop
    allowed = [state.check_context(len(ids), body.max_tokens, echo_only=echo_only) for ids in prompt_ids]
    max_tokens = min(allowed) if body.max_tokens is None else body.max_tokens
    want_lp = body.logprobs is not None
    top_n = body.logprobs or 0

    # the prompt's own logprobs (echo + logprobs): admitted and counted like generation
    scored: list[list[tuple[float | None, list | None]]] = []
    if body.echo and want_lp:  # prefill-only requests in the engine's batch, admitted like generation
        state.admit(len(prompt_ids), param="prompt")
        scoring = submit_scoring_all(state.engine, prompt_ids, top_n, new_id("score"), adapter)
        scored = await collect_scores(scoring, request, state)

    rid, created = new_id("cmpl"), int(time.time())
    n = body.n
    states = [SequenceState(index=p * n + j, prompt_ids=ids) for p, ids in enumerate(prompt_ids) for j in range(n)]
    handles = []
    if max_tokens > 0:
        jobs = [
            (s.prompt_ids, sampling_params(body, max_tokens, top_n if want_lp else None, s.index % n)) for s in states
        ]
        handles = submit_all(state.engine, jobs, rid, adapter)
    else:
        for s in states:
            s.finish_reason = "length"
    state.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompt_ids))

    prompt_text = [t if t is not None else state.tokenizer.decode(ids) for t, ids in zip(prompt_texts, prompt_ids)]

    def chunk(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": served,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }

    def usage() -> dict[str, int]:
        gen = sum(len(s.token_ids) for s in states)
        prompt = sum(len(ids) for ids in prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen}

    def base_logprobs(s: SequenceState) -> _LegacyLogprobs:
        p = s.index // n
        if body.echo:
            return _echo_logprobs(state, prompt_ids[p], scored[p], top_n)
        return _LegacyLogprobs()

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream() -> AsyncIterator[str]:
            offsets = {}
            if body.echo:
                for s in states:
                    lp = base_logprobs(s) if want_lp else None
                    offsets[s.index] = lp.offset if lp else len(prompt_text[s.index // n])
                    yield sse(chunk(s.index, prompt_text[s.index // n], lp.to_dict() if lp else None, s.finish_reason))
            elif max_tokens == 0:
                for s in states:
                    yield sse(chunk(s.index, "", None, s.finish_reason))
            async with aclosing(merged_events(handles, request, state.deadline(), state)) as events:
                async for i, ev in events:
                    s = states[i]
                    record(s, ev)
                    lp = None
                    if want_lp:
                        lp = _LegacyLogprobs(offsets.get(i, 0))
                        _add_generated(state, lp, s, len(s.token_ids) - 1, top_n)
                        offsets[i] = lp.offset
                        lp = lp.to_dict()
                    if ev.text or lp is not None or ev.finish_reason is not None:
                        yield sse(chunk(i, ev.text, lp, ev.finish_reason))
            if include_usage:
                yield sse({**chunk(0, "", None, None), "choices": [], "usage": usage()})

        return EventStreamResponse(guarded_stream(stream(), state, states, t_start), handles)

    await collect(handles, request, state, states, t_start)

    choices = []
    for s in states:
        text = (prompt_text[s.index // n] if body.echo else "") + s.text
        lp = None
        if want_lp:
            lp_obj = base_logprobs(s)
            _add_generated(state, lp_obj, s, 0, top_n)
            lp = lp_obj.to_dict()
        choices.append({"index": s.index, "text": text, "logprobs": lp, "finish_reason": s.finish_reason})
    # a JSONResponse skips FastAPI's jsonable_encoder, which walks every value in Python (an echo
    # request's logprobs hold thousands of entries: ~20 ms of event-loop time per 2,560 tokens)
    return JSONResponse({
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": served,
        "choices": choices,
        "usage": usage(),
    })
