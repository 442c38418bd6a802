"""JetStream's records (results and DLQ records alike), published without waiting for each PubAck.

``put`` publishes the record with a reply subject of its own (one wildcard
subscription takes every PubAck) and returns; a confirmer task takes the
PubAcks in publish order and finishes the record's inputs once it is
stored. A record whose PubAck is an error, a "no responders", or does not
come within ``timeout`` goes through ``retry`` (the awaited store that
retries, with backoff, for as long as the server is away; the same
``Nats-Msg-Id`` keeps a late first copy from counting twice).

Not nats-py's ``publish_async``: it makes a future, a NUID, a semaphore
turn and a ``PubAck`` object per record, and the confirmer then waited on
each future. Here a record costs a counter, a deque entry and a dict entry;
the confirmer sleeps until the PubAck of the head of the line comes (or its
time is up) and then takes every PubAck already in behind it.

At most ``max_pending`` records wait for their PubAck; ``put`` waits for
room beyond that (overload policy: backpressure into intake, counted in
``waits``), as nats-py's pending limit did.

A PubAck that says ``duplicate`` means the stream already holds a record
with this id. The id carries a digest of the result's event ids
(:func:`engine.contracts.records.result_id`), so the stored copy holds exactly these
events: acking them is safe, and it is counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import orjson

from engine.wire.codec import ID_HEADER

log = logging.getLogger("autoglm.durable")

#: The awaited, retrying store of a record and the inputs it finishes; returns
#: the PubAck (or ``None`` in core mode).
Store = Callable[[str, bytes, dict[str, str], tuple[str, ...]], Awaitable[Any]]
#: Finishes the inputs (their deliveries) of a stored record.
Stored = Callable[[tuple[str, ...]], Awaitable[None]]

#: Records waiting for their PubAck at most (nats-py's publish_async allows 4,000).
MAX_PENDING = 4096


class _Record(NamedTuple):
    token: int
    subject: str
    payload: bytes
    headers: dict[str, str]
    acks: tuple[str, ...]
    since: float


def stored_as(answer: bytes | None) -> tuple[bool, bool]:
    """(stored, duplicate) from a PubAck's body; ``None``: no responders."""
    if not answer:
        return False, False
    try:
        reply = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return False, False
    if not isinstance(reply, dict) or "error" in reply or "stream" not in reply:
        return False, False
    return True, bool(reply.get("duplicate"))


class ResultStore:
    """Records in publish order, each confirmed before its inputs are acked."""

    def __init__(
        self,
        nc: Any,
        stored: Stored,
        retry: Store,
        *,
        timeout: float = 2.0,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.nc = nc
        self.stored = stored
        self.retry = retry
        self.timeout = timeout
        self.max_pending = max_pending
        self.retried = 0
        #: Records the stream already held (same id, so the same events).
        self.duplicates = 0
        #: Times ``put`` waited for room (``max_pending`` records unconfirmed).
        self.waits = 0
        self._inbox = ""
        self._sub: Any = None
        self._token = 0
        self._pending: deque[_Record] = deque()
        #: token -> PubAck body (``None``: no responders), until the confirmer takes it.
        self._answers: dict[int, bytes | None] = {}
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._confirm(), name="autoglm:result-store")

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def put(self, subject: str, payload: bytes, headers: dict[str, str], acks: tuple[str, ...]) -> None:
        while len(self._pending) >= self.max_pending:
            self.waits += 1
            self._room.clear()
            await self._room.wait()
        if self._sub is None:
            try:
                inbox = f"{self.nc.new_inbox()}."
                self._sub = await self.nc.subscribe(f"{inbox}*", cb=self._answer)
                self._inbox = inbox
            except Exception as exc:  # connection trouble right now: the awaited path
                await self._slowly(subject, payload, headers, acks, exc)
                return
        self._token += 1
        # In line before it is sent: its PubAck may come while publish is still flushing.
        record = _Record(self._token, subject, payload, headers, acks, time.monotonic())
        self._pending.append(record)
        if len(self._pending) == 1:
            self._wake.set()
        try:
            await self.nc.publish(subject, payload, reply=f"{self._inbox}{record.token}", headers=headers)
        except Exception as exc:
            try:
                self._pending.remove(record)
            except ValueError:
                return  # the confirmer timed it out and stored it the slow way already
            self._room.set()
            await self._slowly(subject, payload, headers, acks, exc)

    async def _slowly(
        self, subject: str, payload: bytes, headers: dict[str, str], acks: tuple[str, ...], exc: Exception
    ) -> None:
        log.warning("publishing %s failed (%s); storing it the slow way", subject, exc)
        self._count(await self.retry(subject, payload, headers, acks))
        await self.stored(acks)

    async def _answer(self, msg: Any) -> None:
        try:
            token = int(msg.subject[len(self._inbox) :])
        except ValueError:
            return
        if not self._pending or token < self._pending[0].token:
            return  # its record timed out and went the slow way
        status = msg.headers.get("Status") if msg.headers else None
        self._answers[token] = None if status == "503" else msg.data
        if token == self._pending[0].token:
            self._wake.set()

    def _count(self, ack: Any) -> None:
        if ack is not None and getattr(ack, "duplicate", False):
            self.duplicates += 1

    async def _confirm(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                # Nothing waits: answers left here are of records whose publish
                # raised in put (taken out of line, stored the slow way).
                self._answers.clear()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            record = self._pending[0]
            if record.token not in self._answers:
                left = record.since + self.timeout - time.monotonic()
                if left > 0:
                    self._wake.clear()
                    timer = loop.call_later(left, self._wake.set)
                    try:
                        await self._wake.wait()
                    finally:
                        timer.cancel()
                    continue
            self._pending.popleft()
            self._room.set()
            answer = self._answers.pop(record.token, None)
            ok, duplicate = stored_as(answer)
            if ok:
                self.duplicates += duplicate
            else:
                self.retried += 1
                try:
                    self._count(await self.retry(record.subject, record.payload, record.headers, record.acks))
                except Exception as exc:  # only when stopping: the inputs stay unacked, redelivered
                    log.error("record %s not stored: %s", record.headers.get(ID_HEADER), exc)
                    continue
            await self.stored(record.acks)

    async def drain(self) -> None:
        """Wait until every put record is confirmed (or given up on at shutdown)."""
        self._closing = True
        self._wake.set()
        if self._task is not None and not self._task.done():
            await self._task
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection is closing anyway
                log.debug("PubAck subscription not removed: %s", exc)
