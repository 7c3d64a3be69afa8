"""The HTTP connection layer: uvicorn's h11 protocol with a header timeout, and a uvicorn.Server
that answers in-flight requests before its graceful timeout and exits 0 after a clean drain.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but never a client that sends
its request headers slowly or not at all (slowloris); `GuardedH11Protocol` closes a connection
whose next request's headers are not complete `header_timeout` seconds after it opened or after
its previous response.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import HANDLED_SIGNALS


class GuardedH11Protocol(H11Protocol):
    """h11 HTTP/1.1 with a deadline for each request's headers."""

    def __init__(self, *args: Any, header_timeout: float | None = 10.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        if self.header_timeout is not None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection: request headers not complete after %ss", self.header_timeout)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a new request's headers were parsed
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before the next request (super() may start a pipelined one and disarm)
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class Server(uvicorn.Server):
    """uvicorn.Server that tells the app when shutdown starts (`on_shutdown`) and, on SIGTERM /
    SIGINT, returns normally after draining instead of re-raising the signal (exit status 0)."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Any = None):
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets: Any = None) -> None:
        if self.on_shutdown is not None:
            self.on_shutdown()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
