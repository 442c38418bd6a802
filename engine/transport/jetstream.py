"""The JetStream transport: a work-queue stream over the inputs and a durable pull consumer.

``<STREAM>_IN`` holds the *unprocessed* backlog: an event leaves it when it
is acked, and it is acked only once what it turned into is safely stored —
the result that holds it (``<STREAM>_OUT``) or its DLQ record. So the
stream's limits bound the backlog, never the history: it refuses new events
(the producer's PubAck says so) only when that many are still waiting.
Replay history is ``<STREAM>_REC``, a mirror with its own limits that drops
its oldest when full. A crash before the store means redelivery, never loss.

While an event waits in an open window, ``in_progress`` keeps ``AckWait``
from firing. A message delivered ``max_deliver`` times is ``poison``: a DLQ
record, then ``term``, so one event can never wedge intake.

After a crash the consumer is rebuilt to deliver the unacked backlog in
stream order (see :func:`engine.transport.streams.replay_point`), and the results
stored since the oldest unacked event are read back so that an event whose
result was stored but whose ack was lost is acked, not fused a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
)
from nats.js.errors import NotFoundError

from engine.contracts.errors import TransportError
from engine.contracts.messages import Finish, Key, Message, Publish
from engine.contracts.subjects import Subjects
from engine.transport.base import Sink, TransportState
from engine.transport.recovery import CrashGuard, ReadBack
from engine.transport.resultstore import ResultStore
from engine.transport.streams import (
    dlq_msg_id,
    ensure,
    mirror_attached,
    record_stream,
    replay_point,
    stream_configs,
    stream_names,
)
from engine.wire.codec import ID_HEADER

if TYPE_CHECKING:
    from engine.config.models import NatsConfig

log = logging.getLogger("autoglm.durable")

#: Seconds a store keeps retrying once the engine is stopping; past it the
#: inputs stay unacked and JetStream delivers them to the next engine.
STOP_RETRY_S = 10.0


def _seq(delivery: str) -> int | None:
    """The stream sequence of a ``js<seq>`` delivery."""
    return int(delivery[2:]) if delivery.startswith("js") and delivery[2:].isdigit() else None


class JetStreamTransport:
    """Streams, the pull consumer, confirmed stores, and the acks the engine still owes."""

    durable = True

    def __init__(self, nc: Any, config: NatsConfig) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.config = config
        self.prefix = config.subject_prefix
        self.subjects = Subjects(config.subject_prefix)
        self.in_stream, self.out_stream = stream_names(config)
        self.rec_stream = record_stream(config)
        #: Inputs in hand, being handled or waiting in windows for their record
        #: to be stored: stream sequence -> (newest delivered copy, last in_progress).
        self.held: dict[int, tuple[Any, float]] = {}
        #: Taken out of the stream by sequence (the crash guard's culprits):
        #: deleted, not acked, once their record is stored.
        self._delete_when_stored: set[int] = set()
        #: The crash guard's culprits of this run: recorded as poison, never handed in.
        self._culprits: set[int] = set()
        self._terminate: set[int] = set()
        self.acked = 0
        self.redelivered = 0
        self.poisoned = 0
        self.handler_errors = 0
        #: Found already stored at recovery: acked without being processed again.
        self.recovered = 0
        self.read_back = ReadBack(self.js, config)
        self.guard = CrashGuard(self.js, config)
        #: max_ack_pending reached: the server delivers nothing until acks free room.
        self.stalled_since: float | None = None
        self.stalls = 0
        self.replayed_from: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._sink: Sink | None = None
        self.results = ResultStore(self.js, self._stored, self._store)
        self.store_retries = 0
        self._stopping = False
        self._stop_deadline = 0.0
        #: Monotonic second of the fetch loop's last turn (watched by health).
        self._last_turn = time.monotonic()

    @property
    def last_turn(self) -> float | None:
        return self._last_turn

    @property
    def tasks(self) -> dict[str, asyncio.Task[None] | None]:
        return {
            "jetstream-fetch": self._task,
            "jetstream-heartbeat": self._beat,
            "result-store": self.results.task,
        }

    def state(self) -> TransportState:
        return TransportState(
            durable=True,
            unacked=len(self.held),
            acked=self.acked,
            redelivered=self.redelivered,
            poisoned=self.poisoned,
            recovered=self.recovered,
            results_duplicate=self.results.duplicates,
            results_retried=self.results.retried,
            store_retries=self.store_retries,
            publishing=self.results.pending,
            stalled=self.stalled_since is not None,
            stalls=self.stalls,
        )

    def slow_consumer(self) -> None:
        return None  # a pull consumer is never a slow consumer

    async def setup(self) -> None:
        """Create or update the streams and the durable consumer; learn from the last run."""
        cfg = self.config
        try:
            for stream in stream_configs(cfg):
                await ensure(self.js, stream)
            if cfg.record_max_bytes > 0:
                await mirror_attached(self.js, self.rec_stream, self.in_stream)
            start, self.replayed_from = await replay_point(self.js, self.in_stream, cfg.consumer)
            self.sub = await self.js.pull_subscribe(
                self.subjects.inputs,
                durable=cfg.consumer,
                stream=self.in_stream,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=cfg.ack_wait_s,
                    max_ack_pending=cfg.max_ack_pending,
                    max_deliver=cfg.max_deliver,
                    deliver_policy=DeliverPolicy.ALL,
                ),
            )
            if start is not None:
                await self.read_back.read_back(start)
            await self.guard.setup()
        except TransportError:
            raise
        except Exception as exc:  # nats-py raises APIError, TimeoutError, NoRespondersError...
            hint = ""
            if "insufficient storage" in str(exc):
                hint = (
                    f" (each stream reserves nats.stream_max_bytes = {cfg.stream_max_bytes} bytes of the "
                    "server's JetStream store, the recording nats.record_max_bytes: lower them, or give "
                    "the server more max_file_store)"
                )
            raise TransportError(f"JetStream setup failed: {exc}{hint}") from exc

    async def close(self, clean: bool) -> None:
        """Note how this run ended (a failed one counts as a crash)."""
        await self.guard.close(clean)

    def stored_before(self, key: Key, delivery: str) -> bool:
        """Recovery found this input's result or DLQ record stored."""
        if key in self.read_back.stored_keys:
            self.recovered += 1
            return True
        return False

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        self.results.start()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._fetch(sink), name="autoglm:jetstream-fetch")
        self._beat = loop.create_task(self._heartbeat(), name="autoglm:jetstream-heartbeat")

    async def _fetch(self, sink: Sink) -> None:
        for seq in self.guard.culprits:  # it took the process down while in hand
            try:
                raw = await self.js.get_msg(self.in_stream, seq=seq)
            except NotFoundError:
                continue
            self.poisoned += 1
            self._delete_when_stored.add(seq)
            self._culprits.add(seq)
            await sink.poison(
                Message(raw.subject, raw.headers, raw.data, f"js{seq}"), self.config.max_deliver
            )
        self.guard.culprits = []
        batch = self.config.fetch_batch
        while not self._stop.is_set():
            self._last_turn = time.monotonic()
            try:
                msgs = await self.sub.fetch(batch, timeout=0.05)
            except (NatsTimeoutError, TimeoutError):
                self._check_stall()
                continue
            except Exception as exc:  # reconnecting, server restarting: try again shortly
                log.warning("JetStream fetch failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if not msgs:
                self._check_stall()
                continue
            if self.stalled_since is not None:
                log.warning("intake resumed after a %.1f s stall", time.monotonic() - self.stalled_since)
                self.stalled_since = None
            for msg in msgs:
                await self._one(msg, sink)

    async def _one(self, msg: Any, sink: Sink) -> None:
        self._last_turn = time.monotonic()
        meta = msg.metadata
        seq = meta.sequence.stream
        if meta.num_delivered > 1:
            self.redelivered += 1
            if seq in self.held:  # still in hand or in a window: its newest copy is the one to ack
                self.held[seq] = (msg, time.monotonic())
                return
        if seq in self._culprits:  # its poison record is stored or on its way: never handed in again
            if seq in self._delete_when_stored:
                self.held[seq] = (msg, time.monotonic())  # ended (terminated) with its record
            else:
                await self._settle(msg, term=True)
            return
        if seq in self.read_back.stored_seqs:  # its DLQ record was stored before a crash lost the ack
            self.recovered += 1
            await self._settle(msg)
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
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), period)
            now = time.monotonic()
            for seq, (msg, since) in list(self.held.items()):
                if now - since >= period:
                    try:
                        await msg.in_progress()
                        if seq in self.held:
                            self.held[seq] = (msg, now)
                    except Exception as exc:  # the connection is down; redelivery covers it
                        log.debug("in_progress failed: %s", exc)

    # -- records --------------------------------------------------------------------

    async def publish(self, out: Publish) -> None:
        """Into the results stream without waiting: :class:`ResultStore` confirms it
        and then finishes ``out.acks``."""
        headers = out.headers
        if out.kind == "rejection" and out.acks and (seq := _seq(out.acks[0])) is not None:
            # A second record of the same input (a redelivery after a lost ack) is dropped.
            headers = {**headers, ID_HEADER: dlq_msg_id(self.in_stream, seq)}
        if out.terminate:
            self._terminate.update(s for d in out.acks if (s := _seq(d)) is not None)
        await self.results.put(out.subject, out.payload, headers, out.acks)

    async def finish(self, done: Finish) -> None:
        await self._stored(done.acks)

    async def _stored(self, acks: tuple[str, ...]) -> None:
        """The record that finishes ``acks`` is stored: ack (or end) their messages."""
        for delivery in acks:
            seq = _seq(delivery)
            if seq is None:
                continue
            held = self.held.pop(seq, None)
            if held is not None:
                await self._settle(held[0], term=seq in self._terminate)
            self._terminate.discard(seq)
            if seq in self._delete_when_stored:
                self._delete_when_stored.discard(seq)
                try:
                    await self.js.delete_msg(self.in_stream, seq)
                except Exception as exc:  # gone already, or the server is away: it is poisoned again
                    log.warning("could not remove poison input %d: %s", seq, exc)

    async def _store(self, subject: str, payload: bytes, headers: dict[str, str]) -> Any:
        """The awaited store: retried with backoff for as long as the server is
        away (the inputs stay unacked and heartbeated meanwhile; ``health`` says
        ``degraded``); returns the PubAck. Only a stopping engine gives up, after
        :data:`STOP_RETRY_S`: its inputs are then delivered again."""
        delay = 0.05
        retrying = False
        try:
            while True:
                try:
                    return await self.js.publish(subject, payload, headers=headers, timeout=2.0)
                except Exception as exc:  # no responders, timeout, reconnecting
                    if self._stopping and time.monotonic() > self._stop_deadline:
                        raise TransportError(f"could not store {subject} in JetStream: {exc}") from exc
                    if not retrying and self._sink is not None:
                        retrying = True
                        self._sink.trouble("store_retrying", True)
                    self.store_retries += 1
                    log.warning("storing %s failed (%s); retrying in %.2f s", subject, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)
        finally:
            if retrying and self._sink is not None:
                self._sink.trouble("store_retrying", False)

    async def drain(self) -> None:
        await self.results.drain()  # every stored record's inputs acked before we leave

    async def _settle(self, msg: Any, *, term: bool = False) -> None:
        try:
            await (msg.term() if term else msg.ack())
            self.acked += 1
        except Exception as exc:  # a lost ack means a redelivery, recognised by recovery or dedup
            log.warning("ack failed: %s", exc)

    async def stop_intake(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._stop_deadline = time.monotonic() + STOP_RETRY_S
        self._stop.set()
        for task in (self._task, self._beat):
            if task is not None and not task.done():
                try:  # a handler stuck for good must not stop the stop: what it holds is redelivered
                    await asyncio.wait_for(asyncio.shield(task), timeout)
                except TimeoutError:
                    log.error("%s did not stop within %.0f s; cancelled", task.get_name(), timeout)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        # A pull subscription left open makes the connection's drain wait for
        # its whole timeout (30 s): the durable consumer stays on the server.
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()
