"""Tools from MCP servers (Model Context Protocol), through the `mcp` package's stdio client.

    with MCPTools("python my_server.py") as server:
        agent = Agent(model, tools=["calculator", *server.tools])

The server runs as a subprocess for as long as the `MCPTools` is open; its session lives on an asyncio
loop in a background thread, so the agent calls the tools synchronously like any other `Tool`.
"""

from __future__ import annotations

import asyncio
import shlex
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from llmkit.agent.tools import Tool, _strip_titles
from llmkit.errors import InputError


def _field(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:  # mcp 2 uses snake_case attributes, mcp 1 camelCase
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


class MCPTools:
    """An MCP server started from a command line; `.tools` are its tools as llmkit `Tool`s."""

    def __init__(self, command: str | list[str], env: dict[str, str] | None = None, timeout: float = 30.0):
        try:
            from mcp import ClientSession, StdioServerParameters
            from mcp.client.stdio import stdio_client
        except ImportError:
            raise InputError("--mcp needs the mcp package: pip install 'llmkit[agent]'") from None
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise InputError("--mcp needs a command that starts an MCP server on stdio, e.g. 'python server.py'")
        self.command, self.timeout = argv, timeout
        self._params = StdioServerParameters(command=argv[0], args=argv[1:], env=env)
        self._client, self._session_cls = stdio_client, ClientSession
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mcp-client", daemon=True)
        self._thread.start()
        self._ready: asyncio.Future | None = None
        self._stop: asyncio.Event | None = None
        self._session: Any = None
        self._runner = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        try:
            listed = self._wait(self._started(), timeout)
        except BaseException:
            self.close()
            raise
        self.tools = [self._tool(t) for t in listed]

    # ---- the session, on the background loop -----------------------------------------------------
    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._ready = asyncio.get_running_loop().create_future()
        try:
            async with self._client(self._params) as (read, write), self._session_cls(read, write) as session:
                await session.initialize()
                self._session = session
                self._ready.set_result(None)
                await self._stop.wait()
        except BaseException as e:  # noqa: BLE001 - reported to whoever waits for the start
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(e)
            raise

    async def _started(self) -> list[Any]:
        while self._ready is None:
            await asyncio.sleep(0.01)
        await self._ready
        result = await self._session.list_tools()
        return list(result.tools)

    def _wait(self, coro: Any, timeout: float) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise InputError(f"MCP server {' '.join(self.command)!r} did not answer within {timeout:g} s") from None
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - a server that fails to start or speak MCP
            raise InputError(f"MCP server {' '.join(self.command)!r} failed: {type(e).__name__}: {e}") from None

    # ---- tools ----------------------------------------------------------------------------------
    def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Call a tool on the server; its text content, or RuntimeError with it when the tool failed."""
        result = self._wait(self._session.call_tool(name, arguments), self.timeout)
        parts = []
        for c in _field(result, "content", default=[]) or []:
            text = _field(c, "text")
            parts.append(text if text is not None else f"[{_field(c, 'type', default='content')}]")
        structured = _field(result, "structured_content", "structuredContent")
        text = "\n".join(parts) if parts else (str(structured) if structured is not None else "")
        if _field(result, "is_error", "isError", default=False):
            raise RuntimeError(text or "the MCP tool reported an error")
        return text

    def _tool(self, t: Any) -> Tool:
        name = t.name
        schema = _field(t, "input_schema", "inputSchema") or {"type": "object", "properties": {}}
        return Tool(name, _field(t, "description") or "", _strip_titles(dict(schema)),
                    lambda **kw: self.call(name, kw), timeout=self.timeout)

    def close(self) -> None:
        """Stop the session and the server process."""
        if not self._loop.is_running():
            return
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        try:
            self._runner.result(10)
        except BaseException:  # noqa: BLE001 - closing: the server may already be gone
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> MCPTools:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
