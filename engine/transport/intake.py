"""One share of the input stream in a worker's hands: its durable pull consumer.

An :class:`Intake` fetches one :class:`~engine.transport.streams.Slot` (a
partition, or all inputs when there is one), hands each message to the sink
and holds it, unacked, until what it turned into is stored; ``in_progress``
keeps ``AckWait`` from firing meanwhile. A message delivered
``max_deliver`` times is ``poison``: a DLQ record, then ``term``, so one
event can never wedge intake.

At start or takeover the consumer is rebuilt to deliver what is left of the
slot in stream order (:func:`~engine.transport.streams.replay_point`), and the
records stored since its oldest input are read back
(:class:`~engine.transport.recovery.ReadBack`): an input whose record was
stored but whose ack was lost (a crash, a worker that died) is acked, not
fused a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from engine.contracts.messages import Message
from engine.transport.base import Sink
from engine.transport.recovery import CrashGuard, ReadBack
from engine.transport.streams import Slot, replay_point, stream_names

if TYPE_CHECKING:
    from engine.config.models import NatsConfig

#: Messages handed in between two turns of the event loop.
YIELD_EVERY = 32

log = logging.getLogger("autoglm.durable")


async def _always() -> bool:
    return True


def consumer_config(config: NatsConfig, slot: Slot) -> ConsumerConfig:
    """The durable pull consumer of ``slot``."""
    return ConsumerConfig(
        durable_name=slot.consumer,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=config.ack_wait_s,
        max_ack_pending=config.max_ack_pending,
        max_deliver=config.max_deliver,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=slot.filter,
    )


async def ensure_consumers(js: Any, config: NatsConfig, every: list[Slot]) -> None:
    """Every slot's consumer exists, owned or not. On a work-queue stream an
    input that no consumer's filter covers is taken by the recording mirror's
    own consumer and leaves the queue (nats-server 2.15): events published
    before any worker ever took their partition would only be in the recording."""
    in_stream = stream_names(config)[0]
    for slot in every:
        try:
            await js.consumer_info(in_stream, slot.consumer)
        except NotFoundError:
            await js.add_consumer(in_stream, consumer_config(config, slot))


class Intake:
    """One slot's consumer, what it holds, and the acks it still owes."""

    def __init__(
        self,
        js: Any,
        config: NatsConfig,
        slot: Slot,
        replicas: int = 1,
    ) -> None:
        self.js = js
        self.config = config
        self.slot = slot
        #: Whether this worker's lease on the slot is surely still its own
        #: without asking (:meth:`~engine.transport.partitions.Ownership.valid`).
        self.valid: Callable[[], bool] = lambda: True
        #: Why intake is held up now ("fetch_failing", "lease_unconfirmed"):
        #: the sink is told, so health says degraded and no window closes as idle.
        self._waiting: str | None = None
        self.in_stream = stream_names(config)[0]
        #: Inputs in hand, being handled or waiting in windows for their record
        #: to be stored: stream sequence -> (newest delivered copy, last in_progress).
        self.held: dict[int, tuple[Any, float]] = {}
        #: Taken out of the stream by sequence (the crash guard's culprits):
        #: deleted, not acked, once their record is stored.
        self.delete_when_stored: set[int] = set()
        #: The crash guard's culprits of this run: recorded as poison, never handed in.
        self._culprits: set[int] = set()
        self.terminate: set[int] = set()
        self.acked = 0
        self.redelivered = 0
        self.poisoned = 0
        self.handler_errors = 0
        #: Found already stored at recovery: acked without being processed again.
        self.recovered = 0
        self.read_back = ReadBack(js, config)
        self.guard = CrashGuard(js, config, slot, replicas)
        #: max_ack_pending reached: the server delivers nothing until acks free room.
        self.stalled_since: float | None = None
        self.stalls = 0
        self.replayed_from: int | None = None
        self.sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closed = asyncio.Event()
        #: Set whenever nothing is held (a handover waits on it).
        self._empty = asyncio.Event()
        #: Monotonic second of the fetch loop's last turn (watched by health).
        self.last_turn = time.monotonic()
        #: Whether this worker's lease on the slot still holds, once the lease
        #: loop has had its word on a stale one (the transport's ownership):
        #: nothing is fetched or handed in without it.
        self.confirmed: Callable[[], Awaitable[bool]] = _always

    @property
    def fetching(self) -> bool:
        return not self._stop.is_set()

    def holds(self, seq: int) -> bool:
        return seq in self.held or seq in self.delete_when_stored

    @property
    def tasks(self) -> dict[str, asyncio.Task[None] | None]:
        return {"jetstream-fetch": self._task, "jetstream-heartbeat": self._beat}

    async def setup(self) -> None:
        """Rebuild the consumer when the last owner left events unfinished, and learn from that run."""
        cfg = self.config
        start, self.replayed_from = await replay_point(self.js, self.in_stream, self.slot)
        self.sub = await self.js.pull_subscribe(
            self.slot.filter,
            durable=self.slot.consumer,
            stream=self.in_stream,
            config=consumer_config(cfg, self.slot),
        )
        if start is not None:
            await self.read_back.read_back(start)
        await self.guard.setup()

    def start(self, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        name = "" if self.slot.name == "0" else f"-{self.slot.name}"
        self._task = loop.create_task(self._fetch(sink), name=f"autoglm:jetstream-fetch{name}")
        self._beat = loop.create_task(self._heartbeat(), name=f"autoglm:jetstream-heartbeat{name}")

    async def _fetch(self, sink: Sink) -> None:
        for seq in self.guard.culprits:  # it took the process down while in hand
            try:
                raw = await self.js.get_msg(self.in_stream, seq=seq)
            except NotFoundError:
                continue
            self.poisoned += 1
            self.delete_when_stored.add(seq)
            self._culprits.add(seq)
            await sink.poison(
                Message(raw.subject, raw.headers, raw.data, f"js{seq}"), self.config.max_deliver
            )
        self.guard.culprits = []
        try:
            await self._fetch_loop(sink)
        finally:
            self._wait(sink, None)

    async def _fetch_loop(self, sink: Sink) -> None:
        batch = self.config.fetch_batch
        while not self._stop.is_set():
            self.last_turn = time.monotonic()
            if not self.valid():  # stale: the lease loop has its word before any pull
                self._wait(sink, "lease_unconfirmed")
            if not await self.confirmed():  # a pull now could take events from the new owner
                await asyncio.sleep(0.05)  # the partition is being dropped: this loop ends
                continue
            try:
                msgs = await self.sub.fetch(batch, timeout=0.05)
            except (NatsTimeoutError, TimeoutError):
                self._wait(sink, None)
                self._check_stall()
                continue
            except Exception as exc:  # reconnecting, a stream electing its leader: try again shortly
                if self._wait(sink, "fetch_failing"):
                    log.warning("JetStream fetch of %s failed (%s); retrying", self.slot.filter, exc)
                await asyncio.sleep(0.5)
                continue
            self._wait(sink, None)
            if not msgs:
                self._check_stall()
                continue
            if self.stalled_since is not None:
                log.warning("intake resumed after a %.1f s stall", time.monotonic() - self.stalled_since)
                self.stalled_since = None
            for i, msg in enumerate(msgs, 1):
                if not self.valid() and not await self.confirmed():  # the rest: the new owner's
                    break
                await self._one(msg, sink)
                if i % YIELD_EVERY == 0:
                    # Handing in rarely suspends: without a turn of the loop now
                    # and then, a batch of a thousand holds back the pump, the
                    # PubAcks and the acks (and every result's latency) until
                    # the next fetch.
                    await asyncio.sleep(0)

    async def _one(self, msg: Any, sink: Sink) -> None:
        self.last_turn = time.monotonic()
        meta = msg.metadata
        seq = meta.sequence.stream
        if meta.num_delivered > 1:
            self.redelivered += 1
            if seq in self.held:  # still in hand or in a window: its newest copy is the one to ack
                self.held[seq] = (msg, time.monotonic())
                return
        if seq in self._culprits:  # its poison record is stored or on its way: never handed in again
            if seq in self.delete_when_stored:
                self.held[seq] = (msg, time.monotonic())  # ended (terminated) with its record
            else:
                await self.settle(msg, term=True)
            return
        if seq in self.read_back.stored_seqs:  # its DLQ record was stored before a crash lost the ack
            self.recovered += 1
            await self.settle(msg)
            return
        try:
            headers = msg.headers
        except Exception:  # nats-py parses lazily on some paths: the codec refuses it
            headers = None
        message = Message(msg.subject, headers, msg.data, f"js{seq}")
        # Held from now on: what it turns into may be stored (and acked) before
        # the handler returns, and a long store retry keeps it heartbeated.
        self.held[seq] = (msg, time.monotonic())
        if meta.num_delivered >= self.config.max_deliver:
            self.poisoned += 1
            await sink.poison(message, meta.num_delivered)
            return
        careful = seq <= self.guard.careful_until
        if careful:  # if this one takes the process down, the next start knows it
            await self.guard.in_hand(seq)
        try:
            await sink.message(message)
            if careful:
                await sink.settle()
                await self.guard.in_hand(None)
        except Exception:  # the sink turns errors into DLQ records; this is its own failure
            self.handler_errors += 1
            self.held.pop(seq, None)
            log.exception("handling sequence %d failed; it will be redelivered", seq)

    def _wait(self, sink: Sink, reason: str | None) -> bool:
        """Intake is held up for ``reason`` (``None``: it is not); returns whether
        that changed. Events that exist are not being read meanwhile, so their
        sources are not idle: a window must not close before they come (they
        would be refused as too late)."""
        if reason == self._waiting:
            return False
        if self._waiting is not None:
            sink.trouble(self._waiting, False)
        if reason is not None:
            sink.trouble(reason, True)
        self._waiting = reason
        return True

    def _check_stall(self) -> None:
        """Say so, once per stall, when max_ack_pending stops delivery: events wait
        in windows (long windows, many sources, a slow GLM) and none can be acked yet."""
        if self.stalled_since is None and len(self.held) >= self.config.max_ack_pending:
            self.stalled_since = time.monotonic()
            self.stalls += 1
            log.warning(
                "intake stalled: %d events held unacked = nats.max_ack_pending (%d); JetStream delivers "
                "nothing more until their windows publish. Raise max_ack_pending, or shorten windows.",
                len(self.held),
                self.config.max_ack_pending,
            )

    async def _heartbeat(self) -> None:
        """``in_progress`` for events held (or being handled) longer than a third of AckWait."""
        period = max(0.5, self.config.ack_wait_s / 3)
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), period)
            now = time.monotonic()
            for seq, (msg, since) in list(self.held.items()):
                if now - since >= period:
                    try:
                        await msg.in_progress()
                        if seq in self.held:
                            self.held[seq] = (msg, now)
                    except Exception as exc:  # the connection is down; redelivery covers it
                        log.debug("in_progress failed: %s", exc)

    # -- outcomes --------------------------------------------------------------------

    async def stored(self, seq: int) -> None:
        """The record that finishes input ``seq`` is stored: ack (or end) it."""
        held = self.held.pop(seq, None)
        if not self.held:
            self._empty.set()
        if held is not None:
            await self.settle(held[0], term=seq in self.terminate)
        self.terminate.discard(seq)
        if seq in self.delete_when_stored:
            self.delete_when_stored.discard(seq)
            try:
                await self.js.delete_msg(self.in_stream, seq)
            except Exception as exc:  # gone already, or the server is away: it is poisoned again
                log.warning("could not remove poison input %d: %s", seq, exc)

    def give_back(self, seqs: list[int]) -> None:
        """Leave these inputs unacked and stop heartbeating them: the next owner
        of the slot receives them again."""
        for seq in seqs:
            self.held.pop(seq, None)
            self.terminate.discard(seq)

    async def emptied(self, timeout: float) -> bool:
        """Wait until nothing is held (the records of what it finished are stored)."""
        deadline = time.monotonic() + timeout
        while self.held:
            self._empty.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), min(left, 1.0))
        return True

    async def settle(self, msg: Any, *, term: bool = False) -> None:
        try:
            await (msg.term() if term else msg.ack())
            self.acked += 1
        except Exception as exc:  # a lost ack means a redelivery, recognised by recovery or dedup
            log.warning("ack failed: %s", exc)

    # -- stopping --------------------------------------------------------------------

    async def stop_fetching(self, timeout: float = 30.0) -> None:
        """Fetch nothing more; what is in hand is still handled (and heartbeated)."""
        self._stop.set()
        task = self._task
        if task is not None and not task.done():
            try:  # a handler stuck for good must not stop the stop: what it holds is redelivered
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                log.error("%s did not stop within %.0f s; cancelled", task.get_name(), timeout)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def close(self, clean: bool) -> None:
        """Stop heartbeating, leave the consumer, and note how this hold ended."""
        await self.stop_fetching()
        self._closed.set()
        if self._beat is not None:
            with contextlib.suppress(Exception):
                await self._beat
        # A pull subscription left open makes the connection's drain wait for
        # its whole timeout (30 s): the durable consumer stays on the server.
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
        await self.guard.close(clean)
