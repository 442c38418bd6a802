"""Durable intake: a JetStream stream over the inputs and a durable pull consumer.

An event is acked only once what it turned into is safely stored: the result
that holds it (published to the results stream, which deduplicates on
``Nats-Msg-Id = <source>:<window start>``) or its DLQ record. A crash before
that means redelivery, never loss; a window rebuilt after a redelivery gets
the same ``Nats-Msg-Id`` and is dropped by the stream as a duplicate.
While an event waits in an open window, ``in_progress`` keeps ``AckWait``
from firing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from engine.codec import ID_HEADER
from engine.errors import TransportError

if TYPE_CHECKING:
    from engine.config import NatsConfig

log = logging.getLogger("autoglm.durable")

#: ``(source, event id)``: how the engine names an event it still owes an ack.
Key = tuple[str, str]
#: Handles one fetched message; returns its key when it must wait for a
#: result, or ``None`` when it is finished (rejected, rate-limited) and can be acked.
Handler = Callable[[Any, str], Awaitable[Key | None]]


def stream_names(config: NatsConfig) -> tuple[str, str]:
    """The input and result streams: ``<STREAM>_IN`` and ``<STREAM>_OUT``."""
    base = config.stream or config.subject_prefix.replace(".", "_").upper()
    return f"{base}_IN", f"{base}_OUT"


class DurableIntake:
    """Streams, the pull consumer, and the acks the engine still owes."""

    def __init__(self, nc: Any, config: NatsConfig) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.config = config
        self.prefix = config.subject_prefix
        self.in_stream, self.out_stream = stream_names(config)
        self.held: dict[Key, tuple[Any, float]] = {}
        self.acked = 0
        self.redelivered = 0
        #: max_ack_pending reached: the server delivers nothing until acks free room.
        self.stalled_since: float | None = None
        self.stalls = 0
        self.replayed_from: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def setup(self) -> None:
        """Create or update both streams and the durable consumer."""
        cfg = self.config
        streams = [
            StreamConfig(
                name=self.in_stream,
                subjects=[f"{self.prefix}.in.>"],
                storage=StorageType.FILE,
                max_age=cfg.stream_max_age_s,
                max_bytes=cfg.stream_max_bytes,
                duplicate_window=cfg.duplicate_window_s,
                # Full: refuse new events (a producer's PubAck says so) rather
                # than silently drop the oldest, which may not be processed yet.
                discard=DiscardPolicy.NEW,
            ),
            StreamConfig(
                name=self.out_stream,
                subjects=[f"{self.prefix}.out.>", f"{self.prefix}.dlq.>", f"{self.prefix}.late.>"],
                storage=StorageType.FILE,
                max_age=cfg.stream_max_age_s,
                max_bytes=cfg.stream_max_bytes,
                duplicate_window=cfg.duplicate_window_s,
            ),
        ]
        try:
            for stream in streams:
                try:
                    await self.js.stream_info(stream.name)
                    await self.js.update_stream(stream)
                except NotFoundError:
                    await self.js.add_stream(stream)
            start = await self._replay_point()
            self.sub = await self.js.pull_subscribe(
                f"{self.prefix}.in.>",
                durable=cfg.consumer,
                stream=self.in_stream,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=cfg.ack_wait_s,
                    max_ack_pending=cfg.max_ack_pending,
                    deliver_policy=DeliverPolicy.ALL if start is None else DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=start,
                ),
            )
        except Exception as exc:  # nats-py raises APIError, TimeoutError, NoRespondersError...
            hint = ""
            if "insufficient storage" in str(exc):
                hint = (
                    f" (each stream reserves nats.stream_max_bytes = {cfg.stream_max_bytes} bytes of the "
                    "server's JetStream store: lower it, or give the server more max_file_store)"
                )
            raise TransportError(f"JetStream setup failed: {exc}{hint}") from exc

    async def _replay_point(self) -> int | None:
        """After a crash, restart the consumer at its ack floor.

        Events the dead engine held unacked would otherwise come back only
        when their AckWait ran out — after newer events had moved the
        watermark, so they would be refused as too late. Replaying from the
        first unacked event in stream order rebuilds the same windows
        (the aligner is deterministic); the ones already published carry the
        same ``Nats-Msg-Id`` and the results stream drops them.
        """
        try:
            info = await self.js.consumer_info(self.in_stream, self.config.consumer)
        except NotFoundError:
            return None
        if not info.num_ack_pending:
            return None
        start = int(info.ack_floor.stream_seq) + 1
        log.warning(
            "%d events were unacked at the last stop: replaying %s from sequence %d",
            info.num_ack_pending,
            self.in_stream,
            start,
        )
        await self.js.delete_consumer(self.in_stream, self.config.consumer)
        self.replayed_from = start
        return start

    def start(self, handle: Handler) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._fetch(handle))
        self._beat = loop.create_task(self._heartbeat())

    async def _fetch(self, handle: Handler) -> None:
        batch = self.config.fetch_batch
        while not self._stop.is_set():
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
                meta = msg.metadata
                if meta.num_delivered > 1:
                    self.redelivered += 1
                key = await handle(msg, f"js{meta.sequence.stream}")
                if key is None:
                    await self._ack(msg)
                else:
                    self.held[key] = (msg, time.monotonic())

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
        """``in_progress`` for events held longer than a third of AckWait."""
        period = max(0.5, self.config.ack_wait_s / 3)
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), period)
            now = time.monotonic()
            for key, (msg, since) in list(self.held.items()):
                if now - since >= period:
                    try:
                        await msg.in_progress()
                        self.held[key] = (msg, now)
                    except Exception as exc:  # the connection is down; redelivery covers it
                        log.debug("in_progress failed: %s", exc)

    async def ack(self, key: Key) -> None:
        """The result or DLQ record of ``key`` is stored: ack its message."""
        held = self.held.pop(key, None)
        if held is not None:
            await self._ack(held[0])

    async def _ack(self, msg: Any) -> None:
        try:
            await msg.ack()
            self.acked += 1
        except Exception as exc:  # a lost ack means a redelivery, deduplicated downstream
            log.warning("ack failed: %s", exc)

    async def stop_fetching(self) -> None:
        self._stop.set()
        for task in (self._task, self._beat):
            if task is not None:
                await task
        # A pull subscription left open makes the connection's drain wait for
        # its whole timeout (30 s): the durable consumer stays on the server.
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()


Store = Callable[[str, bytes, dict[str, str]], Awaitable[None]]
Stored = Callable[[list[Key]], Awaitable[None]]


class ResultStore:
    """Durable mode's results, published without waiting for each PubAck.

    ``put`` hands the result to JetStream (``publish_async``) and returns; a
    confirmer task takes the PubAcks in publish order and acks the result's
    input events once it is stored. A result whose PubAck is an error or does
    not come within ``timeout`` goes through ``retry`` (the awaited, retrying
    store; the same ``Nats-Msg-Id`` keeps a late first copy from counting
    twice). One timer per waiting head of the line instead of one per result:
    by the time the confirmer looks, most PubAcks are in.
    """

    def __init__(self, js: Any, stored: Stored, retry: Store, *, timeout: float = 2.0) -> None:
        self.js = js
        self.stored = stored
        self.retry = retry
        self.timeout = timeout
        self.retried = 0
        self._pending: deque[tuple[Any, str, bytes, dict[str, str], list[Key], float]] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._confirm())

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def put(self, subject: str, payload: bytes, headers: dict[str, str], keys: list[Key]) -> None:
        try:
            fut = await self.js.publish_async(subject, payload, headers=headers)
        except Exception as exc:  # connection trouble right now: the awaited path
            log.warning("publishing %s failed (%s); storing it the slow way", subject, exc)
            await self.retry(subject, payload, headers)
            await self.stored(keys)
            return
        self._pending.append((fut, subject, payload, headers, keys, time.monotonic()))
        self._wake.set()

    async def _confirm(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            fut, subject, payload, headers, keys, since = self._pending[0]
            if not fut.done():
                left = since + self.timeout - time.monotonic()
                if left > 0:
                    await asyncio.wait([fut], timeout=left)
                    continue
                fut.cancel()  # frees its slot in nats-py's pending-publish limit
            self._pending.popleft()
            if fut.cancelled() or fut.exception() is not None:
                self.retried += 1
                try:
                    await self.retry(subject, payload, headers)
                except Exception as exc:  # gone for longer than ack_wait: inputs stay unacked
                    log.error("result %s not stored: %s", headers.get(ID_HEADER), exc)
                    continue
            await self.stored(keys)

    async def drain(self) -> None:
        """Wait until every put result is confirmed (or given up on)."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
