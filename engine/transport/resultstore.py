"""JetStream's records (results and DLQ records alike), published without waiting for each PubAck.

``put`` hands the record to JetStream (``publish_async``) and returns; a
confirmer task takes the PubAcks in publish order and finishes the record's
inputs once it is stored. A result whose PubAck is an error or does
not come within ``timeout`` goes through ``retry`` (the awaited store that
retries, with backoff, for as long as the server is away; the same
``Nats-Msg-Id`` keeps a late first copy from counting twice). One timer per
waiting head of the line instead of one per result: by the time the
confirmer looks, most PubAcks are in.

A PubAck that says ``duplicate`` means the stream already holds a result
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
from typing import Any

from engine.wire.codec import ID_HEADER

log = logging.getLogger("autoglm.durable")

#: The awaited, retrying store of a record and the inputs it finishes; returns
#: the PubAck (or ``None`` in core mode).
Store = Callable[[str, bytes, dict[str, str], tuple[str, ...]], Awaitable[Any]]
#: Finishes the inputs (their deliveries) of a stored record.
Stored = Callable[[tuple[str, ...]], Awaitable[None]]


class ResultStore:
    """Results in publish order, each confirmed before its inputs are acked."""

    def __init__(self, js: Any, stored: Stored, retry: Store, *, timeout: float = 2.0) -> None:
        self.js = js
        self.stored = stored
        self.retry = retry
        self.timeout = timeout
        self.retried = 0
        #: Results the stream already held (same id, so the same events).
        self.duplicates = 0
        self._pending: deque[tuple[Any, str, bytes, dict[str, str], tuple[str, ...], float]] = deque()
        self._wake = asyncio.Event()
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
        try:
            fut = await self.js.publish_async(subject, payload, headers=headers)
        except Exception as exc:  # connection trouble right now: the awaited path
            log.warning("publishing %s failed (%s); storing it the slow way", subject, exc)
            self._count(await self.retry(subject, payload, headers, acks))
            await self.stored(acks)
            return
        self._pending.append((fut, subject, payload, headers, acks, time.monotonic()))
        self._wake.set()

    def _count(self, ack: Any) -> None:
        if ack is not None and getattr(ack, "duplicate", False):
            self.duplicates += 1

    async def _confirm(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            fut, subject, payload, headers, acks, since = self._pending[0]
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
                    ack = await self.retry(subject, payload, headers, acks)
                except Exception as exc:  # only when stopping: the inputs stay unacked, redelivered
                    log.error("result %s not stored: %s", headers.get(ID_HEADER), exc)
                    continue
            else:
                ack = fut.result()
            self._count(ack)
            await self.stored(acks)

    async def drain(self) -> None:
        """Wait until every put result is confirmed (or given up on at shutdown)."""
        self._closing = True
        self._wake.set()
        if self._task is not None and not self._task.done():
            await self._task
