"""A submitted generation request: the caller's side of the `Engine` (iterate it for `TokenEvent`s)."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
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
    logprobs: list[float | None]  # None per token for a request submitted with return_logprobs=False


_END = object()  # end-of-stream marker in a handle's queue


class LoopWaker:
    """Runs callbacks on an event loop from other threads, many per wake-up: the first `wake` of a
    batch schedules one `call_soon_threadsafe` (a self-pipe write, a loop iteration); the ones that
    come before the loop has run it (every row of an engine step) only append to the batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopWaker:
        """The loop's one waker (created on first use; lives as long as the loop)."""
        waker = _WAKERS.get(loop)
        if waker is None:
            waker = _WAKERS.setdefault(loop, cls(loop))
        return waker

    def wake(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(callback)
            if len(self._pending) > 1:
                return  # a wake-up is already on its way
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop is closed: nobody is listening
            with self._lock:
                self._pending.clear()

    def _run(self) -> None:
        with self._lock:
            callbacks, self._pending = self._pending, []
        for callback in callbacks:
            callback()


_WAKERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker] = weakref.WeakKeyDictionary()


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
        self._queue: deque[Any] = deque()  # events not yet taken by the consumer
        self._ready = threading.Condition(self._lock)
        self._listener: tuple[LoopWaker, Callable[[], None]] | None = None  # an event loop's consumer
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
            self._queue.append(item)
            listener = self._listener
            if listener is None:
                self._ready.notify_all()
        if listener is not None:
            listener[0].wake(listener[1])

    # ---- consumer side ------------------------------------------------------------------------
    def listen(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the running event loop whenever items arrive (for `take`); once now if
        some are already waiting. One listener per handle."""
        waker = LoopWaker.of(asyncio.get_running_loop())
        with self._lock:
            self._listener = (waker, callback)
            waiting = bool(self._queue)
        if waiting:
            waker.wake(callback)

    def take(self) -> tuple[list[TokenEvent], bool | BaseException]:
        """(the events delivered and not yet taken, end): end is False while more may come, True once
        the stream is over (finished, cancelled or aborted: nothing is delivered after `cancel()`),
        or the exception the engine failed with (raise it)."""
        with self._lock:
            items = list(self._queue)
            self._queue.clear()
        if self._cancelled:
            return [], True
        end: bool | BaseException = False
        if items and (items[-1] is _END or isinstance(items[-1], BaseException)):
            end = True if items[-1] is _END else items[-1]
            items.pop()
        return items, end

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
        arrived = asyncio.Event()  # set when items arrive
        self.listen(arrived.set)
        while True:
            events, end = self.take()
            for event in events:
                yield event
                if self._cancelled:
                    return
            if isinstance(end, BaseException):
                raise end
            if end:
                return
            if not events:
                await arrived.wait()
                arrived.clear()

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
