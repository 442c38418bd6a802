"""``autoglm monitor``'s process: one NATS connection, the feed, uvicorn.

A process of its own, apart from every engine: it reads NATS like any other
consumer, so it watches one engine or a fleet of workers alike and a slow
browser never slows an engine. :func:`monitor_task` is the same thing for a
caller already running an event loop (``autoglm demo --monitor``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import uvicorn

from engine.contracts.errors import ConfigError
from engine.monitor.app import build_app
from engine.monitor.feed import Feed
from engine.monitor.state import MonitorState

#: Loopback: a page anyone on the network can read is an explicit ``--host 0.0.0.0``.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class Monitor:
    """The feed and the web server over one NATS connection (the caller's)."""

    def __init__(
        self,
        nc: Any,
        prefix: str = "autoglm",
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        frames: bool = True,
        interval: float = 1.0,
    ) -> None:
        self.state = MonitorState()
        self.feed = Feed(nc, self.state, prefix, interval=interval, frames=frames)
        config = uvicorn.Config(
            build_app(self.state, closing=lambda: self.server.should_exit),
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.host = host

    async def serve(self, ready: Callable[[str], None] | None = None) -> None:
        """Run until :meth:`stop` (or a signal); ``ready`` gets the page's URL."""
        await self.feed.start()
        task = asyncio.create_task(self.server.serve(), name="monitor-http")
        try:
            while not self.server.started:
                if task.done():  # could not bind: the port is taken, the host unknown
                    raise ConfigError([f"--host {self.host} --port {self.server.config.port}: cannot listen"])
                await asyncio.sleep(0.05)
            if ready is not None:
                ready(self.url)
            await task
        finally:
            await self.feed.stop()
            if not task.done():
                self.server.should_exit = True
                with contextlib.suppress(Exception):
                    await task

    def stop(self) -> None:
        self.server.should_exit = True

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"
