"""A submitted generation request: the caller's side of the `Engine` (iterate it for `TokenEvent`s)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from llmkit.infer.sampling import SamplingParams
from llmkit.infer.sequence import TokenEvent


@dataclass
class GenerationResult:
    """Everything a finished request produced (see `RequestHandle.result`)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float]


_END = object()  # end-of-stream marker in a handle's queue


class RequestHandle:
    """A submitted request: iterate it (blocking or `async for`) to receive `TokenEvent`s.

    Iteration ends after the event carrying `finish_reason`, or right away after `cancel()`
    (then `finish_reason` is "cancelled") or an engine abort ("abort"). If the engine failed
    while running the request, iteration raises that error.
    """

    def __init__(self, engine: Any, request_id: str, prompt_ids: list[int], params: SamplingParams):
        self.engine = engine
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.token_ids: list[int] = []  # generated so far (the stop token included)
        self.text = ""  # emitted so far
        self.finish_reason: str | None = None
        self.prompt_logprobs: list | None = None  # a scoring request's result (`Engine.submit_scoring`)
        # time.monotonic() stamps, for latency metrics (time to first token, total)
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._lock = threading.Lock()
        self._queue: deque[Any] = deque()  # events until someone iterates
        self._ready = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue | None = None
        self._done = False
        self._cancelled = False

    # ---- producer side (engine thread, or cancel()) -----------------------------------------
    def _push(self, item: Any) -> None:
        with self._lock:
            if self._done:
                return
            if item is _END or isinstance(item, BaseException):
                self._done = True
                self.finished_at = time.monotonic()
            elif self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
                except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                    pass
            else:
                self._queue.append(item)
                self._ready.notify_all()

    # ---- consumer side ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._lock:
                while not self._queue:
                    self._ready.wait()
                item = self._queue.popleft()
            if item is _END or self._cancelled:  # after cancel() nothing more is delivered
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[TokenEvent]:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
                self._aqueue = asyncio.Queue()
                while self._queue:
                    self._aqueue.put_nowait(self._queue.popleft())
        while True:
            item = await self._aqueue.get()
            if item is _END or self._cancelled:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def result(self) -> GenerationResult:
        """Block until the request finishes; return its tokens, text and finish reason."""
        logprobs = [ev.logprob for ev in self]
        return GenerationResult(self.request_id, list(self.token_ids), self.text, self.finish_reason, logprobs)

    def cancel(self) -> None:
        """Stop generating (e.g. the client disconnected): iteration ends now, the slot and KV blocks
        are freed at the engine's next step boundary."""
        self.engine._cancel(self)

    @property
    def done(self) -> bool:
        return self._done
