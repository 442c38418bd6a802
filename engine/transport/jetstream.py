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
stream order (see :meth:`DurableIntake._replay_point`), and the results
stored since the oldest unacked event are read back so that an event whose
result was stored but whose ack was lost is acked, not fused a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
)
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from engine.contracts.errors import TransportError
from engine.contracts.messages import Finish, Key, Message, Publish
from engine.contracts.subjects import Subjects
from engine.transport.base import Sink, TransportState
from engine.transport.resultstore import ResultStore
from engine.wire.codec import ID_HEADER

if TYPE_CHECKING:
    from engine.config.models import NatsConfig

log = logging.getLogger("autoglm.durable")

#: Seconds a store keeps retrying once the engine is stopping; past it the
#: inputs stay unacked and JetStream delivers them to the next engine.
STOP_RETRY_S = 10.0


def stream_names(config: NatsConfig) -> tuple[str, str]:
    """The input and result streams: ``<STREAM>_IN`` and ``<STREAM>_OUT``."""
    base = config.stream or config.subject_prefix.replace(".", "_").upper()
    return f"{base}_IN", f"{base}_OUT"


def record_stream(config: NatsConfig) -> str:
    """The replay history: ``<STREAM>_REC``, a mirror of the input stream."""
    return stream_names(config)[0][: -len("_IN")] + "_REC"


def state_bucket(config: NatsConfig) -> str:
    """The KV bucket where an engine notes how its last run ended: ``<STREAM>_STATE``."""
    return stream_names(config)[0][: -len("_IN")] + "_STATE"


def dlq_msg_id(stream: str, seq: int) -> str:
    """``Nats-Msg-Id`` of the DLQ record of input ``seq``: a second record of the
    same input (a redelivery after a lost ack) is dropped by the results stream."""
    return f"dlq:{stream}:{seq}"


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
        self._terminate: set[int] = set()
        self.acked = 0
        self.redelivered = 0
        self.poisoned = 0
        self.handler_errors = 0
        #: Found already stored at recovery: acked without being processed again.
        self.recovered = 0
        self._stored_keys: set[Key] = set()
        self._stored_seqs: set[int] = set()
        #: max_ack_pending reached: the server delivers nothing until acks free room.
        self.stalled_since: float | None = None
        self.stalls = 0
        self.replayed_from: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        #: Crash isolation (see :meth:`_crash_guard`): handle inputs up to this
        #: sequence one by one, each noted in the state bucket while in hand.
        self.careful_until = 0
        self._poison_first: list[int] = []
        self._kv: Any = None
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
        """Create or update the streams and the durable consumer."""
        cfg = self.config
        inputs = StreamConfig(
            name=self.in_stream,
            subjects=[self.subjects.inputs],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=cfg.stream_max_age_s,
            max_bytes=cfg.stream_max_bytes,
            duplicate_window=cfg.duplicate_window_s,
            # Full: refuse new events (the producer's PubAck says so); what
            # fills it is unprocessed, so dropping the oldest would lose data.
            discard=DiscardPolicy.NEW,
        )
        outputs = StreamConfig(
            name=self.out_stream,
            subjects=list(self.subjects.outputs),
            storage=StorageType.FILE,
            max_age=cfg.stream_max_age_s,
            max_bytes=cfg.stream_max_bytes,
            duplicate_window=cfg.duplicate_window_s,
        )
        try:
            await self._ensure(inputs)
            await self._ensure(outputs)
            if cfg.record_max_bytes > 0:
                await self._ensure(
                    StreamConfig(
                        name=self.rec_stream,
                        mirror=StreamSource(name=self.in_stream),
                        storage=StorageType.FILE,
                        max_age=cfg.record_max_age_s,
                        max_bytes=cfg.record_max_bytes,
                        discard=DiscardPolicy.OLD,
                    )
                )
                await self._mirror_attached()
            start = await self._replay_point()
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
                await self._recover(start)
            await self._crash_guard()
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

    async def _ensure(self, stream: StreamConfig) -> None:
        try:
            info = await self.js.stream_info(stream.name)
        except NotFoundError:
            await self.js.add_stream(stream)
            return
        have = info.config.retention
        if stream.retention is not None and have != stream.retention:
            raise TransportError(
                # nats-py reads it back as a plain string, not the enum
                f"stream {stream.name} has retention {getattr(have, 'value', have) or '?'} but the engine "
                f"needs {stream.retention.value}; it was made by an older version: "
                f"delete it (nats stream rm {stream.name}) or set nats.stream to a new name"
            )
        if stream.mirror is None:  # a mirror's configuration cannot be updated
            await self.js.update_stream(stream)

    async def _mirror_attached(self, timeout: float = 5.0) -> None:
        """Wait until the recording mirror follows the input stream: events acked
        before it attaches would leave the work queue unrecorded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await self.js.stream_info(self.rec_stream)
            if info.mirror is not None and info.mirror.active is not None and info.mirror.active >= 0:
                return
            await asyncio.sleep(0.05)
        log.warning("the recording stream %s has not attached to %s yet", self.rec_stream, self.in_stream)

    async def _replay_point(self) -> datetime | None:
        """At start: what is left in the work queue is unfinished. Returns its
        oldest event's stream time (results stored since then are read back),
        or ``None`` when the queue is empty.

        The decision rests on the stream, not on the consumer: a crash while
        the consumer was being rebuilt, or during the read-back, leaves a
        fresh consumer that knows nothing of what was delivered before.

        The consumer is rebuilt to deliver the whole queue in stream order
        when it holds unacked events (otherwise they would come back only
        when their AckWait ran out, after newer events had moved the
        watermark, and be refused as too late) or when the queue holds
        events the consumer no longer delivers (it gave up on them at
        max_deliver while the engine could not hear them).
        """
        state = (await self.js.stream_info(self.in_stream)).state
        if not state.messages:
            return None
        try:
            info = await self.js.consumer_info(self.in_stream, self.config.consumer)
        except NotFoundError:
            info = None
        oldest = await self.js.get_msg(self.in_stream, seq=state.first_seq, next=True)
        if info is not None and (
            info.num_ack_pending or state.messages > info.num_pending + info.num_ack_pending
        ):
            log.warning(
                "%d events unfinished at the last stop (%d unacked): replaying %s from sequence %d",
                state.messages,
                info.num_ack_pending,
                self.in_stream,
                oldest.seq,
            )
            await self.js.delete_consumer(self.in_stream, self.config.consumer)
            self.replayed_from = oldest.seq
        when: datetime | None = oldest.time
        return when

    @property
    def _inflight_key(self) -> str:
        return f"{self.config.consumer}.inflight"

    @property
    def _run_key(self) -> str:
        return f"{self.config.consumer}.run"

    async def _crash_guard(self) -> None:
        """Catch an input that takes the whole process down.

        A decoder's segfault or the OOM killer escapes every ``try``, and since
        the consumer is rebuilt at each start, ``max_deliver`` too: restarted
        by its supervisor, the engine would meet the same input forever, and
        nothing behind it would ever be processed. So each start notes in the
        state bucket whether the last run ended cleanly and what the oldest
        unfinished input was. After ``max_deliver - 1`` crashes in a row with
        the same oldest input, the backlog is handled one input at a time,
        each noted while in hand (through its processors): the start after the
        next crash finds the culprit there, records it as ``poison`` and
        removes it from the queue.
        """
        name = state_bucket(self.config)
        try:
            self._kv = await self.js.key_value(name)
        except BucketNotFoundError:
            self._kv = await self.js.create_key_value(
                KeyValueConfig(bucket=name, history=1, storage=StorageType.FILE)
            )
        last = await self._read(self._run_key)
        culprit = await self._read(self._inflight_key)
        if culprit is not None:
            log.error("input %s took the engine down while in hand: recording it as poison", culprit)
            self._poison_first.append(int(culprit))
            await self._note(self._inflight_key, None)
        state = (await self.js.stream_info(self.in_stream)).state
        oldest = state.first_seq if state.messages else None
        crashes = 0
        if isinstance(last, dict) and not last.get("clean") and oldest is not None and culprit is None:
            crashes = int(last.get("crashes", 0)) + 1 if last.get("oldest") == oldest else 1
        if crashes >= self.config.max_deliver - 1:
            self.careful_until = state.last_seq
            log.warning(
                "%d crashes in a row with input %d unfinished: handling inputs up to %d one at a time "
                "to find the one that takes the engine down",
                crashes,
                oldest,
                self.careful_until,
            )
        await self._note(self._run_key, orjson.dumps({"clean": False, "crashes": crashes, "oldest": oldest}))

    async def _read(self, key: str) -> Any:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        return orjson.loads(entry.value) if entry.value else None

    async def _note(self, key: str, value: bytes | None) -> None:
        """Write (``None``: delete) a state entry; trouble here must not stop intake."""
        try:
            if value is None:
                await self._kv.delete(key)
            else:
                await self._kv.put(key, value)
        except Exception as exc:  # the server is away: the guard is best effort
            log.warning("state bucket: %s", exc)

    async def close(self, clean: bool) -> None:
        """Note how this run ended (a failed one counts as a crash)."""
        if self._kv is not None and clean:
            await self._note(self._run_key, orjson.dumps({"clean": True, "crashes": 0, "oldest": None}))

    async def _recover(self, since: datetime) -> None:
        """Read the results and DLQ records stored since ``since``: their inputs
        are done, whatever became of their acks."""
        sub = await self.js.pull_subscribe(
            self.subjects.everything,
            stream=self.out_stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=since - timedelta(seconds=1),
                inactive_threshold=30.0,
            ),
        )
        try:
            while True:
                try:
                    batch = await sub.fetch(500, timeout=1.0)
                except (NatsTimeoutError, TimeoutError):
                    break
                for msg in batch:
                    self._remember(msg)
                if not batch or batch[-1].metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        log.warning(
            "recovery: %d events and %d rejected inputs were already stored since %s",
            len(self._stored_keys),
            len(self._stored_seqs),
            since.isoformat(),
        )

    def _remember(self, msg: Any) -> None:
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        if msg_id.startswith(f"dlq:{self.in_stream}:"):
            with contextlib.suppress(ValueError):
                self._stored_seqs.add(int(msg_id.rsplit(":", 1)[1]))
            return
        try:
            record = orjson.loads(msg.data)
            source = record["source"]
            groups = [*(record.get("events") or {}).values(), *(record.get("skipped") or {}).values()]
            if record.get("event_id"):  # a DLQ record
                groups.append([record["event_id"]])
            self._stored_keys.update((source, eid) for group in groups for eid in group)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            log.warning("recovery: unreadable record on %s", msg.subject)

    def stored_before(self, key: Key, delivery: str) -> bool:
        """Recovery found this input's result or DLQ record stored."""
        if key in self._stored_keys:
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
        for seq in self._poison_first:  # it took the process down while in hand
            try:
                raw = await self.js.get_msg(self.in_stream, seq=seq)
            except NotFoundError:
                continue
            self.poisoned += 1
            self._delete_when_stored.add(seq)
            await sink.poison(
                Message(raw.subject, raw.headers, raw.data, f"js{seq}"), self.config.max_deliver
            )
        self._poison_first = []
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
        if seq in self._stored_seqs:  # its DLQ record was stored before a crash lost the ack
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
        careful = seq <= self.careful_until
        if careful:  # if this one takes the process down, the next start knows it
            await self._note(self._inflight_key, str(seq).encode())
        try:
            await sink.message(message)
            if careful:
                await sink.settle()
                await self._note(self._inflight_key, None)
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
