"""Run the sequences of one HTTP request on the engine and merge their token streams.

One request can ask for several sequences (a list of prompts, `n` choices). They are
submitted together, so they join the running batch together; their events arrive through
one queue, tagged with the choice index. While waiting, the request watches for a client
that went away and for its deadline, and in every case cancels what is still running.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from llmkit.errors import InputError
from llmkit.infer.engine import EngineClosedError, QueueFullError, RequestHandle, TokenEvent
from llmkit.infer.sampling import SamplingParams
from llmkit.serve.errors import APIError
from llmkit.serve.sse import DONE, SSE_HEADERS, sse_error

POLL_S = 0.25  # how often a waiting request checks for a disconnect and its deadline


@dataclass
class SequenceState:
    """What one choice produced so far, plus its timing for the metrics."""

    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float | None] = field(default_factory=list)  # None when the request shows none
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    t_first: float | None = None
    t_end: float | None = None


def submit_all(
    engine: Any, jobs: list[tuple[list[int], SamplingParams]], request_id: str, adapter: str | None = None
) -> list[RequestHandle]:
    """Submit every (prompt_ids, params) job; all or none: any failure cancels the ones already
    queued, so no choice of a refused request keeps running without a client.
    `adapter`: the LoRA adapter the request's `model` named (None: the base model)."""
    extra = {"adapter": adapter} if adapter is not None else {}
    return _submit_atomically([  # log-probabilities only for requests that show them (params.logprobs)
        functools.partial(engine.submit, ids, params, request_id=f"{request_id}-{i}", return_logprobs=False, **extra)
        for i, (ids, params) in enumerate(jobs)
    ])


def submit_scoring_all(
    engine: Any, prompts: list[list[int]], top_n: int, request_id: str, adapter: str | None = None
) -> list[RequestHandle]:
    """Submit prompt-scoring requests (`Engine.submit_scoring`), all or none, like `submit_all`."""
    return _submit_atomically([
        functools.partial(engine.submit_scoring, ids, top_n, request_id=f"{request_id}-{i}", adapter=adapter)
        for i, ids in enumerate(prompts)
    ])


def _submit_atomically(calls: list[Callable[[], RequestHandle]]) -> list[RequestHandle]:
    handles: list[RequestHandle] = []
    try:
        for call in calls:
            handles.append(call())
    except BaseException as e:
        for h in handles:
            h.cancel()
        if isinstance(e, QueueFullError):
            raise APIError(str(e), 429, code="queue_full", headers={"Retry-After": "1"}) from None
        if isinstance(e, EngineClosedError):
            raise APIError(str(e), 503, code="shutting_down", headers={"Retry-After": "5"}) from None
        if isinstance(e, InputError):
            raise APIError(str(e), 400) from None
        raise
    return handles


async def merged_events(
    handles: list[RequestHandle],
    request: Request | None,
    deadline: float | None,
    server: Any = None,
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Yield (choice index, event) from every handle as events arrive.

    Stops early, cancelling every handle, when the client disconnects (the iterator just ends),
    the deadline passes (raises a 504 `APIError`) or the server's shutdown deadline passes
    (`server.check_shutdown()`, a 503). Handles are always cancelled on exit, which is a no-op
    for finished ones, so an abandoned request never keeps its batch slot.
    """
    loop = asyncio.get_running_loop()
    arrived = asyncio.Event()  # set when a handle has new items (one wake-up per engine step)

    def tick() -> None:  # every POLL_S: look at the deadline and the connection even without events
        nonlocal timer, ticked
        ticked = True
        arrived.set()
        timer = loop.call_later(POLL_S, tick)

    for h in handles:
        h.listen(arrived.set)
    ticked = False
    timer = loop.call_later(POLL_S, tick)
    is_open = [True] * len(handles)
    open_count = len(handles)
    last_check = time.monotonic()
    try:
        while open_count:
            await arrived.wait()
            arrived.clear()
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise APIError("the request timed out before generation finished", 504, code="timeout")
            if server is not None:
                server.check_shutdown()  # 503 once the graceful timeout is about to run out
            if ticked or now - last_check >= POLL_S:
                ticked, last_check = False, now
                if request is not None and await request.is_disconnected():
                    return
            for i, h in enumerate(handles):
                if not is_open[i]:
                    continue
                events, end = h.take()
                for event in events:
                    yield i, event
                if isinstance(end, asyncio.CancelledError):
                    raise end
                if isinstance(end, BaseException):
                    raise APIError(f"generation failed: {end}", 500, code="engine_error")
                if end:
                    is_open[i] = False
                    open_count -= 1
    finally:
        timer.cancel()
        for h in handles:
            h.cancel()


class EventStreamResponse(StreamingResponse):
    """An SSE response that cancels its handles however it ends, even if the body never started
    (a client gone before the headers were sent)."""

    def __init__(self, content: AsyncIterator[str], handles: list[RequestHandle]):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.handles = handles

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for h in self.handles:
                h.cancel()


def record(state: SequenceState, ev: TokenEvent) -> None:
    """Fold one event into a choice's state."""
    now = time.monotonic()
    if state.t_first is None:
        state.t_first = now
    state.token_ids.append(ev.token_id)
    state.text += ev.text
    state.logprobs.append(ev.logprob)
    state.top_logprobs.append(ev.top_logprobs)
    if ev.finish_reason is not None:
        state.finish_reason = ev.finish_reason
        state.t_end = now


def observe_all(server: Any, states: list[SequenceState], t_start: float) -> None:
    """Record TTFT / TPOT / latency / token counts of every choice that produced tokens."""
    now = time.monotonic()
    for s in states:
        if s.token_ids:
            server.metrics.observe_sequence(t_start, s.t_first, s.t_end or now, len(s.token_ids))


async def raise_if_unfinished(states: list[SequenceState], request: Request) -> None:
    """A sequence without a finish reason was cut off: the client left (499) or the engine stopped (503)."""
    if all(s.finish_reason is not None for s in states):
        return
    if await request.is_disconnected():
        raise APIError("client disconnected", 499, code="client_closed_request")
    raise APIError("generation was aborted before it finished (is the server shutting down?)", 503, code="aborted")


async def collect(
    handles: list[RequestHandle], request: Request, server: Any, states: list[SequenceState], t_start: float
) -> None:
    """Run a non-streaming request to the end: every event recorded into `states`, metrics observed."""
    try:
        async with aclosing(merged_events(handles, request, server.deadline(), server)) as events:
            async for i, ev in events:
                record(states[i], ev)
    finally:
        observe_all(server, states, t_start)
    await raise_if_unfinished(states, request)


async def collect_scores(handles: list[RequestHandle], request: Request, server: Any) -> list[list]:
    """Wait for scoring requests (disconnect, deadline and shutdown handled as for generation);
    return each prompt's `prompt_logprobs`."""
    async with aclosing(merged_events(handles, request, server.deadline(), server)) as events:
        async for _ in events:  # scoring requests stream no events
            pass
    if any(h.prompt_logprobs is None for h in handles):
        if await request.is_disconnected():
            raise APIError("client disconnected", 499, code="client_closed_request")
        raise APIError("scoring was aborted before it finished (is the server shutting down?)", 503, code="aborted")
    return [h.prompt_logprobs for h in handles]


async def guarded_stream(
    lines: AsyncIterator[str], server: Any, states: list[SequenceState], t_start: float
) -> AsyncIterator[str]:
    """The SSE `lines` of a streaming request, then `[DONE]`; an error met mid-stream becomes an
    `error` event instead of a dead socket, and the metrics are observed however it ends."""
    try:
        async with aclosing(lines) as inner:
            async for line in inner:
                yield line
        yield DONE
    except APIError as e:
        yield sse_error(e.body())
    except Exception as e:  # noqa: BLE001
        yield sse_error(APIError(f"internal error: {e}", 500).body())
    finally:
        observe_all(server, states, t_start)
