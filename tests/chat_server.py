"""A real OpenAI-compatible chat-completions server on loopback, for tests.

``behaviour(n, body)`` decides each reply: ``("ok", text)``, ``("status", code)``,
``("slow", seconds)`` then ok, or ``("hang", None)``. The server records every
request body and header set, and the most requests it saw at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson

Behaviour = Callable[[int, dict[str, Any]], tuple[str, Any]]


def echo(n: int, body: dict[str, Any]) -> tuple[str, Any]:
    prompt = body["messages"][-1]["content"]
    text = prompt if isinstance(prompt, str) else prompt[0]["text"]
    return ("ok", f"seen: {text[:40]}")


class ChatServer:
    def __init__(self, behaviour: Behaviour = echo) -> None:
        self.behaviour = behaviour
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.active = 0
        self.max_active = 0
        self._server: asyncio.Server | None = None
        self._arrived = asyncio.Event()
        self.url = ""

    async def __aenter__(self) -> ChatServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1)

    async def wait_for_requests(self, n: int, timeout: float = 10.0) -> None:
        """Return once ``n`` requests have arrived (a condition, not a sleep)."""
        async with asyncio.timeout(timeout):
            while len(self.requests) < n:
                self._arrived.clear()
                await self._arrived.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                body = orjson.loads(await reader.readexactly(int(headers.get("content-length", "0"))))
                n = len(self.requests)
                self.requests.append(body)
                self.headers.append(headers)
                self._arrived.set()
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                try:
                    kind, arg = self.behaviour(n, body)
                    if kind == "hang":
                        await asyncio.sleep(3600)
                    if kind == "slow":
                        await asyncio.sleep(arg)
                        kind, arg = echo(n, body)
                    if kind == "status":
                        payload, status = b'{"error": "try later"}', arg
                    else:
                        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": arg}}]}
                        payload, status = orjson.dumps(reply), 200
                finally:
                    self.active -= 1
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
