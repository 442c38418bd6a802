"""Core NATS: a plain subscription, at-most-once.

Nothing is acked and nothing is delivered again: what a crash loses is lost,
which is what a producer that chose core NATS asked for. Records are
published fire-and-forget. nats-py buffers up to :data:`PENDING_MSGS`
messages for the subscription before it reports a slow consumer and drops
(each drop counted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from engine.contracts.messages import Finish, Key, Message, Publish
from engine.transport.base import Sink, TransportState

#: Messages nats-py may buffer for the ingest subscription before it reports a
#: slow consumer (and drops, which we count).
PENDING_MSGS = 200_000


class CoreTransport:
    """Plain subscription on ``<prefix>.in.>``; publishes without confirmation."""

    durable = False

    def __init__(self, nc: Any, subject: str) -> None:
        self.nc = nc
        self.subject = subject
        self._sub: Any = None
        self._slow = 0

    @property
    def tasks(self) -> Mapping[str, asyncio.Task[None] | None]:
        return {}

    @property
    def last_turn(self) -> float | None:
        return None

    async def setup(self) -> None:
        return None

    def stored_before(self, key: Key, delivery: str) -> bool:
        return False

    async def start(self, sink: Sink) -> None:
        async def on_msg(msg: Any) -> None:
            try:
                headers = msg.headers
            except Exception:  # nats-py parses lazily on some paths: the codec refuses it
                headers = None
            await sink.message(Message(msg.subject, headers, msg.data))

        self._sub = await self.nc.subscribe(
            self.subject,
            cb=on_msg,
            pending_msgs_limit=PENDING_MSGS,
            pending_bytes_limit=1024 * 1024 * 1024,
        )

    async def publish(self, out: Publish) -> None:
        await self.nc.publish(out.subject, out.payload, headers=out.headers or None)

    async def finish(self, done: Finish) -> None:
        return None

    async def stop_intake(self) -> None:
        if self._sub is not None:
            await self._sub.drain()

    async def drain(self) -> None:
        return None

    async def close(self, clean: bool) -> None:
        return None

    def state(self) -> TransportState:
        return TransportState(durable=False, slow_consumer=self._slow)

    def slow_consumer(self) -> None:
        self._slow += 1
