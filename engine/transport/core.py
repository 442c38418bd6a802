"""Core NATS: plain subscriptions, at-most-once.

Nothing is acked and nothing is delivered again: what a crash loses is lost,
which is what a producer that chose core NATS asked for. Records are
published fire-and-forget. nats-py buffers up to :data:`PENDING_MSGS`
messages for a subscription before it reports a slow consumer and drops
(each drop counted).

With ``nats.partitions = N`` the server maps ``in.<source>.<modality>`` to
``part.<p>.<source>.<modality>`` (the embedded server is started with the
mapping; a user's own server needs it in its config, see docs/scaling.md)
and each worker subscribes to the partitions it owns by lease (KV, so the
server needs JetStream even though intake does not use it). A handover
closes and publishes the partition's open windows: nothing could deliver
their events again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine.contracts.errors import EventRejected
from engine.contracts.messages import Finish, Key, Message, Publish
from engine.contracts.subjects import partition_of
from engine.transport.base import Sink, TransportState
from engine.transport.partitions import Ownership
from engine.transport.streams import Slot, slots

if TYPE_CHECKING:
    from engine.config.models import NatsConfig

#: Messages nats-py may buffer for the ingest subscription before it reports a
#: slow consumer (and drops, which we count).
PENDING_MSGS = 200_000


class CoreTransport:
    """Plain subscriptions on ``<prefix>.in.>`` (or on the owned partitions);
    publishes without confirmation."""

    durable = False

    def __init__(self, nc: Any, subject: str, *, config: NatsConfig | None = None, replicas: int = 1) -> None:
        self.nc = nc
        self.subject = subject
        self.config = config
        self._subs: dict[str, Any] = {}
        self._slow = 0
        self._sink: Sink | None = None
        self.ownership: Ownership | None = None
        if config is not None and config.partitions > 1:
            self.ownership = Ownership(
                nc.jetstream(),
                config,
                slots(config),
                take=self._take,
                give=self._give,
                lose=self._give,
                replicas=replicas,
            )

    @property
    def tasks(self) -> Mapping[str, asyncio.Task[None] | None]:
        return {"partitions": self.ownership.task} if self.ownership is not None else {}

    @property
    def last_turn(self) -> float | None:
        return None

    async def setup(self) -> None:
        if self.ownership is not None:
            await self.ownership.setup()

    def stored_before(self, key: Key, delivery: str) -> bool:
        return False

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        if self.ownership is None:
            await self._subscribe("0", self.subject)
            return
        await self.ownership.tick(wait=True)
        self.ownership.start()

    async def _subscribe(self, name: str, subject: str) -> None:
        sink = self._sink
        assert sink is not None
        n = self.config.partitions if self.config is not None else 1
        head = subject[:-1]  # <prefix>.part.<p>.
        mine = int(name) if n > 1 and name.isdigit() else None

        async def on_msg(msg: Any) -> None:
            try:
                headers = msg.headers
            except Exception:  # nats-py parses lazily on some paths: the codec refuses it
                headers = None
            message = Message(msg.subject, headers, msg.data)
            if mine is not None:
                # Only the server's mapping writes here; anyone can publish here
                # too, and a source in two partitions has its windows split.
                source = msg.subject[len(head) :].split(".", 1)[0]
                if partition_of(source, n) != mine:
                    why = EventRejected(
                        "bad_subject",
                        f"subject {msg.subject!r}: source {source!r} is not in partition {mine}; "
                        "publish on <prefix>.in.<source>.<modality>",
                    )
                    await sink.refuse(message, why)
                    return
            await sink.message(message)

        self._subs[name] = await self.nc.subscribe(
            subject,
            cb=on_msg,
            pending_msgs_limit=PENDING_MSGS,
            pending_bytes_limit=1024 * 1024 * 1024,
        )

    async def _take(self, slot: Slot) -> None:
        await self._subscribe(slot.name, slot.filter)

    async def _give(self, slot: Slot) -> None:
        """Let the partition go: what was received is handled, then its windows
        close and publish now (the next owner starts new ones)."""
        sub = self._subs.pop(slot.name, None)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.drain()
        if self._sink is not None and self.config is not None and slot.name.isdigit():
            p, n = int(slot.name), self.config.partitions
            await self._sink.release(lambda source: partition_of(source, n) == p, finish=True)

    async def publish(self, out: Publish) -> None:
        await self.nc.publish(out.subject, out.payload, headers=out.headers or None)

    async def finish(self, done: Finish) -> None:
        return None

    def give_back(self, acks: tuple[str, ...]) -> None:
        return None  # nothing is held: core NATS delivers once

    async def stop_intake(self) -> None:
        if self.ownership is not None:
            await self.ownership.stop()
        for sub in self._subs.values():
            with contextlib.suppress(Exception):
                await sub.drain()

    async def drain(self) -> None:
        return None

    async def close(self, clean: bool) -> None:
        if self.ownership is not None:
            await self.ownership.leave()

    def state(self) -> TransportState:
        own = self.ownership
        if own is None:
            return TransportState(durable=False, slow_consumer=self._slow)
        return TransportState(
            durable=False,
            slow_consumer=self._slow,
            worker=own.worker,
            partitions=tuple(own.owned),
            workers=tuple(own.members),
            moves=own.taken + own.given + own.lost,
        )

    def slow_consumer(self) -> None:
        self._slow += 1
