"""How the engine thread hands events to an event loop: one wake-up per batch (`LoopWaker`),
`RequestHandle.listen` / `take`, and request text tokenized on or off the loop by size (`off_loop`)."""

import asyncio
import threading

from llmkit.infer.request import _END, LoopWaker, RequestHandle
from llmkit.infer.sampling import SamplingParams
from llmkit.infer.sequence import TokenEvent
from llmkit.serve.protocol import ChatMessage, TextPart
from llmkit.serve.state import INLINE_CHARS, off_loop, text_size


class _Engine:
    def _cancel(self, handle):  # what Engine._cancel does to the handle
        handle._cancelled = True
        handle.finish_reason = "cancelled"
        handle._push(_END)


def _event(i: int, finish: str | None = None) -> TokenEvent:
    return TokenEvent(i, f"t{i}", -0.5, None, finish)


def test_loop_waker_one_wakeup_per_batch():
    async def main():
        loop = asyncio.get_running_loop()
        scheduled = []
        real = loop.call_soon_threadsafe

        def counting(cb, *args):
            scheduled.append(cb)
            return real(cb, *args)

        loop.call_soon_threadsafe = counting
        waker = LoopWaker.of(loop)
        assert LoopWaker.of(loop) is waker
        ran = []
        # another thread wakes 8 callbacks while the loop is busy: one scheduled run for all of them
        t = threading.Thread(target=lambda: [waker.wake(lambda i=i: ran.append(i)) for i in range(8)])
        t.start()
        t.join()
        assert len(scheduled) == 1 and ran == []
        await asyncio.sleep(0)
        assert ran == list(range(8))
        waker.wake(lambda: ran.append(8))  # the next batch schedules again
        await asyncio.sleep(0)
        assert ran == list(range(9)) and len(scheduled) == 2

    asyncio.run(main())


def test_handle_listen_take_and_async_iteration():
    async def main():
        h = RequestHandle(_Engine(), "r", [1, 2], SamplingParams())
        h._push(_event(0))  # delivered before anyone listens: reported at once
        woken = []
        h.listen(lambda: woken.append(1))
        await asyncio.sleep(0)
        assert woken == [1]
        threading.Thread(target=lambda: [h._push(_event(1)), h._push(_event(2, "length")), h._push(_END)]).start()
        got, end = [], False
        while not end:
            events, end = h.take()
            got += [e.token_id for e in events]
            await asyncio.sleep(0.01)
        assert got == [0, 1, 2] and end is True

        h2 = RequestHandle(_Engine(), "r2", [1], SamplingParams())
        pusher = threading.Thread(target=lambda: [h2._push(_event(i)) for i in range(5)] + [h2._push(_END)])
        pusher.start()
        assert [e.token_id async for e in h2] == [0, 1, 2, 3, 4]
        pusher.join()

        h3 = RequestHandle(_Engine(), "r3", [1], SamplingParams())
        h3._push(_event(0))
        h3.cancel()  # nothing is delivered after cancel(), the stream is over
        assert h3.take() == ([], True) and [e async for e in h3] == []

        h4 = RequestHandle(_Engine(), "r4", [1], SamplingParams())
        h4._push(_event(0))
        h4._push(RuntimeError("forward failed"))
        events, end = h4.take()
        assert [e.token_id for e in events] == [0] and isinstance(end, RuntimeError)

    asyncio.run(main())


def test_off_loop_by_size():
    async def main():
        here = threading.get_ident()
        small = await off_loop(text_size(["ab", [1, 2, 3]]), threading.get_ident)
        large = await off_loop(text_size("x" * (INLINE_CHARS + 1)), threading.get_ident)
        return here, small, large

    here, small, large = asyncio.run(main())
    assert small == here and large != here
    assert text_size(["ab", [1, 2, 3]]) == 5 and text_size({"a": "xyz", "b": None}) == 3
    part = TextPart(type="text", text="x" * 5000)  # a chat message's content parts count by their text
    assert text_size(ChatMessage(role="user", content=[part]).content) >= 5000
