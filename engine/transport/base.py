"""The transport interface: how messages reach the pipeline and records leave it.

Two implementations, chosen once at start: :class:`engine.transport.core.CoreTransport`
(a plain subscription, at-most-once) and
:class:`engine.transport.jetstream.JetStreamTransport` (a work-queue stream, a
durable pull consumer, records stored with confirmed pipelined publishes and
inputs acked only after their record is stored). Nothing outside them asks
which one runs; partitioning will be a property of a transport too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from engine.contracts.errors import EventRejected
from engine.contracts.messages import Finish, Key, Message, Publish


class Sink(Protocol):
    """What a transport delivers to (the engine's driver)."""

    async def message(self, msg: Message) -> None:
        """Handle one message; its records come back through :meth:`Transport.publish`."""

    async def poison(self, msg: Message, delivered: int) -> None:
        """A message delivered ``delivered`` times without an outcome: reject it."""

    async def refuse(self, msg: Message, why: EventRejected) -> None:
        """Reject a message the transport will not hand in (its DLQ record)."""

    async def settle(self) -> None:
        """Return once what was handed in went through its processors."""

    def trouble(self, reason: str, active: bool) -> None:
        """The transport cannot make progress (``active``) or can again."""

    async def release(self, owns: Callable[[str], bool], *, finish: bool = False) -> list[str]:
        """Hand over the sources ``owns`` picks (their partition moves to another
        worker): returns once nothing of theirs is in the processors, with the
        deliveries of the events of their open windows, given back unfinished;
        ``finish``: close and publish those windows instead (core NATS, where
        nothing would deliver their events again)."""


@dataclass(frozen=True, slots=True)
class TransportState:
    """A copy of what a transport counts, for observers."""

    durable: bool
    #: Inputs received and not yet finished (JetStream: unacked).
    unacked: int = 0
    acked: int = 0
    redelivered: int = 0
    poisoned: int = 0
    #: Found already stored at recovery: finished without being processed again.
    recovered: int = 0
    #: Records the stream already held under their id (counted, not stored twice).
    results_duplicate: int = 0
    #: Records stored again after a failed or missing PubAck.
    results_retried: int = 0
    store_retries: int = 0
    #: Records handed over and not yet confirmed.
    publishing: int = 0
    stalled: bool = False
    stalls: int = 0
    #: Messages the client dropped because intake fell behind (core NATS).
    slow_consumer: int = 0
    #: This worker's name, the partitions it owns now, the live workers of its
    #: configuration, and how many times a partition came or went.
    worker: str = ""
    partitions: tuple[str, ...] = ()
    workers: tuple[str, ...] = ()
    moves: int = 0
    #: Owned partition -> inputs waiting in it or unacked (read each lease turn).
    lag: tuple[tuple[str, int], ...] = ()


class Transport(Protocol):
    """One way of moving messages; see the module docstring."""

    @property
    def durable(self) -> bool:
        """Inputs survive a crash (JetStream)."""

    @property
    def tasks(self) -> Mapping[str, asyncio.Task[None] | None]:
        """Long-running tasks the supervisor watches."""

    @property
    def last_turn(self) -> float | None:
        """Monotonic second of the intake loop's last turn (``None``: no loop to watch)."""

    async def setup(self) -> None:
        """Create what the transport needs on the server (streams, consumers)."""

    def stored_before(self, key: Key, delivery: str) -> bool:
        """Recovery found this input's record already stored."""

    async def start(self, sink: Sink) -> None:
        """Begin delivering messages to ``sink``."""

    async def publish(self, out: Publish) -> None:
        """Publish a record; its ``acks`` are finished once it is stored."""

    async def finish(self, done: Finish) -> None:
        """Finish deliveries that need no record."""

    def give_back(self, acks: tuple[str, ...]) -> None:
        """Stop holding these deliveries (their record could not be published):
        left unacked, they are delivered again once their ack wait runs out."""

    async def stop_intake(self) -> None:
        """Receive nothing more (what is in hand is still handled)."""

    async def drain(self) -> None:
        """Return once every published record is confirmed (or given up on at shutdown)."""

    async def close(self, clean: bool) -> None:
        """Release what the transport holds; ``clean``: the run ended well."""

    def state(self) -> TransportState:
        """What it counted so far."""

    def slow_consumer(self) -> None:
        """The client dropped a message (a slow-consumer error)."""
