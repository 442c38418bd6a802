"""The JetStream transport: a work-queue stream over the inputs, pull consumers, confirmed stores.

``<STREAM>_IN`` holds the *unprocessed* backlog: an event leaves it when it
is acked, and it is acked only once what it turned into is safely stored —
the result that holds it (``<STREAM>_OUT``) or its DLQ record. So the
stream's limits bound the backlog, never the history: it refuses new events
(the producer's PubAck says so) only when that many are still waiting.
Replay history is ``<STREAM>_REC``, a mirror with its own limits that drops
its oldest when full. A crash before the store means redelivery, never loss.

With ``nats.partitions = N`` the input stream's subject transform spreads
sources over N partitions, each with its own consumer (an
:class:`~engine.transport.intake.Intake`); workers own partitions by lease
(:mod:`engine.transport.partitions`). Taking one over replays what its last
owner left unfinished; handing one over publishes what is done, leaves the
open windows' events unacked for the new owner, and only then lets go. One
engine alone owns them all, as before partitioning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nats.js.errors import BucketNotFoundError, NotFoundError

from engine.contracts.errors import TransportError
from engine.contracts.messages import Finish, Key, Publish
from engine.contracts.subjects import partition_of
from engine.transport.base import Sink, TransportState
from engine.transport.intake import Intake, ensure_consumers
from engine.transport.partitions import Ownership, keys
from engine.transport.resultstore import ResultStore
from engine.transport.streams import (
    Slot,
    dlq_msg_id,
    ensure,
    mirror_attached,
    partitions_of,
    record_stream,
    slots,
    stream_configs,
    stream_names,
    workers_bucket,
)
from engine.wire.codec import ID_HEADER

if TYPE_CHECKING:
    from engine.config.models import NatsConfig

log = logging.getLogger("autoglm.durable")

#: Seconds a store keeps retrying once the engine is stopping; past it the
#: inputs stay unacked and JetStream delivers them to the next engine.
STOP_RETRY_S = 10.0
#: Seconds a handover waits for the records of what it finished to be stored.
HANDOVER_S = 60.0

_COUNTERS = ("acked", "redelivered", "poisoned", "handler_errors", "recovered", "stalls")


def _seq(delivery: str) -> int | None:
    """The stream sequence of a ``js<seq>`` delivery."""
    return int(delivery[2:]) if delivery.startswith("js") and delivery[2:].isdigit() else None


def owner_test(slot: Slot, partitions: int) -> Callable[[str], bool]:
    """Which sources' windows belong to ``slot`` (the ``rest`` holds none: its
    inputs never parse, so they are refused before any window)."""
    if partitions == 1:
        return lambda source: True
    if not slot.name.isdigit():
        return lambda source: False
    p = int(slot.name)
    return lambda source: partition_of(source, partitions) == p


class JetStreamTransport:
    """Streams, the owned partitions' intakes, and confirmed stores."""

    durable = True

    def __init__(self, nc: Any, config: NatsConfig, *, worker: str | None = None, replicas: int = 1) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.config = config
        self.replicas = replicas
        self.in_stream, self.out_stream = stream_names(config)
        self.rec_stream = record_stream(config)
        self.intakes: dict[str, Intake] = {}
        #: Counts of intakes handed over or lost, so the totals never go back.
        self._past: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.ownership = Ownership(
            self.js,
            config,
            slots(config),
            take=self._take,
            give=self._give,
            lose=self._lose,
            worker=worker,
            replicas=replicas,
        )
        self.ownership.after = self._measure
        self._lag: dict[str, int] = {}
        #: The supervisor's watch and release (set by the engine): an intake's
        #: loops are watched from its takeover until its handover.
        self.watch: Callable[[str, asyncio.Task[None] | None], None] = lambda name, task: None
        self.unwatch: Callable[[asyncio.Task[None] | None], None] = lambda task: None
        self._sink: Sink | None = None
        self.results = ResultStore(self.nc, self._stored, self._store)
        self.store_retries = 0
        #: Records not stored because their partition was no longer this worker's.
        self.fenced = 0
        self._stopping = False
        self._stop_deadline = 0.0

    @property
    def worker(self) -> str:
        return self.ownership.worker

    @property
    def last_turn(self) -> float | None:
        turns = [i.last_turn for i in self.intakes.values() if i.fetching]
        return min(turns) if turns else None

    @property
    def tasks(self) -> dict[str, asyncio.Task[None] | None]:
        return {"partitions": self.ownership.task, "result-store": self.results.task}

    @property
    def handler_errors(self) -> int:
        return self._sum("handler_errors")

    def _sum(self, name: str) -> int:
        return self._past[name] + sum(int(getattr(i, name)) for i in self.intakes.values())

    def state(self) -> TransportState:
        return TransportState(
            durable=True,
            unacked=sum(len(i.held) for i in self.intakes.values()),
            acked=self._sum("acked"),
            redelivered=self._sum("redelivered"),
            poisoned=self._sum("poisoned"),
            recovered=self._sum("recovered"),
            results_duplicate=self.results.duplicates,
            results_retried=self.results.retried,
            store_retries=self.store_retries,
            publishing=self.results.pending,
            stalled=any(i.stalled_since is not None for i in self.intakes.values()),
            stalls=self._sum("stalls"),
            worker=self.worker,
            partitions=tuple(self.ownership.owned),
            workers=tuple(self.ownership.members),
            moves=self.ownership.taken + self.ownership.given + self.ownership.lost,
            lag=tuple((name, self._lag[name]) for name in self.ownership.owned if name in self._lag),
        )

    def slow_consumer(self) -> None:
        return None  # a pull consumer is never a slow consumer

    async def setup(self) -> None:
        """Create or update the streams and the workers' bucket."""
        cfg = self.config
        try:
            await self._same_partitions_as_the_others()
            for stream in stream_configs(cfg, self.replicas):
                await ensure(self.js, stream)
                if stream.name == self.in_stream:  # before the recording mirror attaches
                    await ensure_consumers(self.js, cfg, slots(cfg))
            if cfg.record_max_bytes > 0:
                await mirror_attached(self.js, self.rec_stream, self.in_stream)
            await self.ownership.setup()
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

    async def _same_partitions_as_the_others(self) -> None:
        """Refuse another ``nats.partitions`` while workers of this configuration
        live: rewriting the transform under them leaves partitions nobody owns."""
        try:
            info = await self.js.stream_info(self.in_stream)
        except NotFoundError:
            return
        had = partitions_of(info.config.subject_transform)
        if had == self.config.partitions:
            return
        try:
            kv = await self.js.key_value(workers_bucket(self.config))
            live = await keys(kv, "w.*")
        except BucketNotFoundError:
            return
        if live:
            raise TransportError(
                f"nats.partitions = {self.config.partitions}, but {len(live)} worker(s) of this "
                f"configuration run with nats.partitions = {had} ({', '.join(k[2:] for k in live[:3])}): "
                "stop them all (and let the input stream empty) before changing it"
            )

    async def start(self, sink: Sink) -> None:
        """Take what is rightfully ours and free now (a lone engine: everything),
        then keep the leases in step with the live workers."""
        self._sink = sink
        self.results.start()
        try:
            await self.ownership.tick(wait=True)
        except TransportError:
            raise
        except Exception as exc:
            raise TransportError(f"JetStream setup failed: {exc}") from exc
        self.ownership.start()

    # -- partitions ---------------------------------------------------------------------

    async def _take(self, slot: Slot) -> None:
        intake = Intake(self.js, self.config, slot, self.replicas)
        intake.valid = lambda: self.ownership.valid(slot.name)
        intake.confirmed = lambda: self.ownership.confirmed(slot.name)
        await intake.setup()
        assert self._sink is not None
        self.intakes[slot.name] = intake
        intake.start(self._sink)
        for name, task in intake.tasks.items():
            self.watch(name if slot.name == "0" else f"{name}-{slot.name}", task)
        log.info("partition %s: consuming %s", slot.name, slot.filter)

    async def _give(self, slot: Slot) -> None:
        """Hand a partition over: finish what is done, give back what is open."""
        intake = self.intakes.get(slot.name)
        if intake is None:
            return
        for task in intake.tasks.values():  # its loops end now on purpose
            self.unwatch(task)
        await intake.stop_fetching()
        assert self._sink is not None
        given = await self._sink.release(owner_test(slot, self.config.partitions))
        intake.give_back([s for d in given if (s := _seq(d)) is not None])
        if not await intake.emptied(HANDOVER_S):  # the records of finished windows are being stored
            log.error(
                "partition %s: %d inputs still unfinished after %.0f s; handed over unacked",
                slot.name,
                len(intake.held),
                HANDOVER_S,
            )
        await self._retire(slot, intake, clean=True)

    async def _lose(self, slot: Slot) -> None:
        """Another worker has the partition now: drop its work, ack nothing more."""
        intake = self.intakes.get(slot.name)
        if intake is None:
            return
        for task in intake.tasks.values():
            self.unwatch(task)
        await intake.stop_fetching()
        if self._sink is not None:
            given = await self._sink.release(owner_test(slot, self.config.partitions))
            intake.give_back([s for d in given if (s := _seq(d)) is not None])
        intake.held.clear()
        await self._retire(slot, intake, clean=False)

    async def _retire(self, slot: Slot, intake: Intake, *, clean: bool) -> None:
        await intake.close(clean)
        for name in _COUNTERS:
            self._past[name] += getattr(intake, name)
        self.intakes.pop(slot.name, None)

    async def _measure(self) -> None:
        """Each lease turn: how far behind each owned partition is."""
        for name, intake in list(self.intakes.items()):
            try:
                info = await self.js.consumer_info(self.in_stream, intake.slot.consumer)
            except Exception:  # the server is away; the last figure stands
                continue
            self._lag[name] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        for name in [n for n in self._lag if n not in self.intakes]:
            del self._lag[name]

    def _holder(self, seq: int) -> Intake | None:
        for intake in self.intakes.values():
            if intake.holds(seq):
                return intake
        return None

    def stored_before(self, key: Key, delivery: str) -> bool:
        """Recovery found this input's result or DLQ record stored."""
        seq = _seq(delivery)
        intake = self._holder(seq) if seq is not None else None
        if intake is not None and key in intake.read_back.stored_keys:
            intake.recovered += 1
            return True
        return False

    # -- records --------------------------------------------------------------------

    async def publish(self, out: Publish) -> None:
        """Into the results stream without waiting: :class:`ResultStore` confirms it
        and then finishes ``out.acks``."""
        if out.acks and not await self._may_store(out.acks):
            self.fenced += 1
            if self.fenced == 1 or self.fenced % 100 == 0:  # after a stall they come in hundreds
                log.warning(
                    "a %s on %s not stored: this worker no longer holds its partition, whose owner "
                    "replays it (%d records so far)",
                    out.kind,
                    out.subject,
                    self.fenced,
                )
            return
        headers = out.headers
        if out.kind == "rejection" and out.acks and (seq := _seq(out.acks[0])) is not None:
            # A second record of the same input (a redelivery after a lost ack) is dropped.
            headers = {**headers, ID_HEADER: dlq_msg_id(self.in_stream, seq)}
        if out.terminate:
            for d in out.acks:
                if (s := _seq(d)) is not None and (intake := self._holder(s)) is not None:
                    intake.terminate.add(s)
        await self.results.put(out.subject, out.payload, headers, out.acks)

    async def _may_store(self, acks: tuple[str, ...]) -> bool:
        """A record is stored only while its inputs are held under a lease that
        still holds (see :meth:`Ownership.confirmed`). Otherwise (a worker that
        stalled past its lease, a record that comes after its partition was
        lost or handed over: a late GLM answer) another worker has its inputs,
        or will at its next turn, and stores their records: ours could split a
        window or put an event in two records."""
        seq = next((s for d in acks if (s := _seq(d)) is not None), None)
        if seq is None:
            return True
        intake = self._holder(seq)  # a record's inputs are of one source: one partition
        return intake is not None and await self.ownership.confirmed(intake.slot.name)

    def give_back(self, acks: tuple[str, ...]) -> None:
        for d in acks:
            if (seq := _seq(d)) is not None and (intake := self._holder(seq)) is not None:
                intake.give_back([seq])

    async def finish(self, done: Finish) -> None:
        if await self._ours(done.acks):
            await self._stored(done.acks)

    async def _ours(self, acks: tuple[str, ...]) -> bool:
        """May this worker ack ``acks``, or go on storing their record? Not once
        their partition is lost (the new owner replays them and stores its own
        record), and not while its lease is stale until the lease loop has had
        its word (:meth:`Ownership.confirmed`). Inputs held by no intake are
        not judged here."""
        intake = next((i for d in acks if (q := _seq(d)) is not None and (i := self._holder(q))), None)
        if intake is None or await self.ownership.confirmed(intake.slot.name):
            return True
        name = intake.slot.name
        log.warning("partition %s is no longer ours: %d inputs left to its new owner", name, len(acks))
        return False

    async def _stored(self, acks: tuple[str, ...]) -> None:
        """The record that finishes ``acks`` is stored: ack (or end) their messages."""
        for delivery in acks:
            seq = _seq(delivery)
            if seq is not None and (intake := self._holder(seq)) is not None:
                await intake.stored(seq)

    async def _store(
        self, subject: str, payload: bytes, headers: dict[str, str], acks: tuple[str, ...]
    ) -> Any:
        """The awaited store: retried with backoff for as long as the server is
        away (the inputs stay unacked and heartbeated meanwhile; ``health`` says
        ``degraded``); returns the PubAck. Only a stopping engine gives up, after
        :data:`STOP_RETRY_S`, and one whose partition was lost meanwhile: its
        inputs are then delivered again."""
        delay = 0.05
        retrying = False
        try:
            while True:
                if not await self._ours(acks):
                    raise TransportError(f"{subject}: the partition of its inputs is no longer ours")
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

    async def stop_intake(self, timeout: float = 30.0) -> None:
        """Take and fetch nothing more; the leases are kept (renewed) until :meth:`close`."""
        self._stopping = True
        self._stop_deadline = time.monotonic() + STOP_RETRY_S
        await self.ownership.stop()
        for intake in list(self.intakes.values()):
            await intake.stop_fetching(timeout)

    async def drain(self) -> None:
        await self.results.drain()  # every stored record's inputs acked before we leave

    async def close(self, clean: bool) -> None:
        """Note how this run ended (a failed one counts as a crash) and give the
        leases up, so the other workers take over now."""
        for intake in list(self.intakes.values()):
            with contextlib.suppress(Exception):
                await intake.close(clean)
        await self.ownership.leave()
