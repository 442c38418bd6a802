"""Dynamic micro-batching that knows nothing about models.

:class:`Batcher` is the pure policy: a bounded FIFO that says when a batch is
due (``max_batch_size`` items waiting, or ``max_wait`` since the oldest one
arrived) given the time you pass in, so it is tested with a hand-moved clock.
:class:`BatchWorker` drives it on an asyncio loop and runs each batch through
an async function, with at most ``concurrency`` batches in flight: while every
worker is busy the queue grows, so batches get bigger exactly when the machine
is behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from engine.contracts.errors import BackpressureError, ProcessorError
from engine.contracts.types import Clock, Nanos
from engine.observe.stats import QUEUE_WAIT_BUCKETS, Histogram

T = TypeVar("T")
R = TypeVar("R")

OverloadPolicy = Literal["drop_oldest", "reject_new"]


@dataclass
class BatchStats:
    """What a batcher did: batch sizes, time items waited, what it dropped."""

    sizes: Counter[int] = field(default_factory=Counter)
    items: int = 0
    wait_ns_total: int = 0
    wait_ns_max: int = 0
    #: Each item's wait, in seconds (the ``autoglm_queue_wait_seconds`` histogram).
    wait: Histogram = field(default_factory=lambda: Histogram(QUEUE_WAIT_BUCKETS))
    dropped: int = 0
    rejected: int = 0

    @property
    def mean_wait_ms(self) -> float:
        return self.wait_ns_total / self.items / 1e6 if self.items else 0.0

    @property
    def mean_batch(self) -> float:
        batches = sum(self.sizes.values())
        return self.items / batches if batches else 0.0


class Batcher(Generic[T]):
    """Bounded FIFO with a batching policy. Not thread-safe; one loop owns it."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_ns: Nanos,
        max_queue: int,
        overload: OverloadPolicy = "drop_oldest",
    ) -> None:
        if max_batch_size < 1 or max_wait_ns < 0 or max_queue < 1:
            raise ValueError("max_batch_size >= 1, max_wait_ns >= 0 and max_queue >= 1")
        self.max_batch_size = max_batch_size
        self.max_wait_ns = max_wait_ns
        self.max_queue = max_queue
        self.overload = overload
        self.stats = BatchStats()
        self._queue: deque[tuple[Nanos, T]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, item: T, now: Nanos) -> T | None:
        """Queue ``item``. Returns the item dropped to make room (``drop_oldest``),
        raises :class:`BackpressureError` under ``reject_new`` when full."""
        dropped: T | None = None
        if len(self._queue) >= self.max_queue:
            if self.overload == "reject_new":
                self.stats.rejected += 1
                raise BackpressureError(f"batch queue full ({self.max_queue} items waiting)")
            dropped = self._queue.popleft()[1]
            self.stats.dropped += 1
        self._queue.append((now, item))
        return dropped

    def deadline(self) -> Nanos | None:
        """When the oldest waiting item's ``max_wait`` runs out (``None`` if empty)."""
        return self._queue[0][0] + self.max_wait_ns if self._queue else None

    def due(self, now: Nanos) -> bool:
        if not self._queue:
            return False
        return len(self._queue) >= self.max_batch_size or now >= self._queue[0][0] + self.max_wait_ns

    def take(self, now: Nanos, *, force: bool = False) -> list[T]:
        """Pop the next batch if one is due (or anything waiting when ``force``)."""
        if not (force and self._queue) and not self.due(now):
            return []
        n = min(self.max_batch_size, len(self._queue))
        batch = []
        for _ in range(n):
            enq, item = self._queue.popleft()
            wait = max(0, now - enq)
            self.stats.wait_ns_total += wait
            self.stats.wait_ns_max = max(self.stats.wait_ns_max, wait)
            self.stats.wait.observe(wait / 1e9)
            batch.append(item)
        self.stats.sizes[n] += 1
        self.stats.items += n
        return batch


def check_outputs(inputs: Sequence[object], outputs: Sequence[object], what: str) -> None:
    """A batch function must return one output per input, in order."""
    if len(outputs) != len(inputs):
        raise ProcessorError(f"{what} returned {len(outputs)} outputs for {len(inputs)} inputs")


class BatchWorker(Generic[T]):
    """Runs due batches of a :class:`Batcher` through ``run_batch`` on the loop.

    ``run_batch`` owns the per-item outcome (it is the router's job to turn a
    batch into results and DLQ records); exceptions it lets escape are passed
    to the async ``on_error`` with the batch so nothing is lost silently.
    """

    def __init__(
        self,
        batcher: Batcher[T],
        run_batch: Callable[[list[T]], Awaitable[None]],
        on_error: Callable[[list[T], BaseException], Awaitable[None]],
        *,
        concurrency: int = 1,
        clock: Clock = time.monotonic_ns,
    ) -> None:
        self.batcher = batcher
        self._run_batch = run_batch
        self._on_error = on_error
        self._clock = clock
        self._slots = concurrency
        self._busy = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._room = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def wait_for_room(self) -> None:
        """Return once the queue has room (the ``complete`` intake policy)."""
        while len(self.batcher) >= self.batcher.max_queue:
            self._room.clear()
            await self._room.wait()

    def submit(self, item: T) -> T | None:
        """Queue one item; returns an item dropped for room (see :meth:`Batcher.offer`)."""
        dropped = self.batcher.offer(item, self._clock())
        self._idle.clear()
        self._wake.set()
        return dropped

    async def _loop(self) -> None:
        while True:
            now = self._clock()
            if self._busy < self._slots:
                batch = self.batcher.take(now, force=self._closing)
                if batch:
                    self._room.set()
                    self._launch(batch)
                    continue
            if self._closing and not self.batcher and not self._busy:
                self._idle.set()
                return
            if not self.batcher and not self._busy:
                self._idle.set()
            deadline = self.batcher.deadline() if self._busy < self._slots else None
            timeout = None if deadline is None else max(0.0, (deadline - now) / 1e9)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _launch(self, batch: list[T]) -> None:
        self._busy += 1
        task = asyncio.get_running_loop().create_task(self._guarded(batch))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _guarded(self, batch: list[T]) -> None:
        try:
            await self._run_batch(batch)
        except Exception as exc:
            await self._on_error(batch, exc)
        finally:
            self._busy -= 1
            self._wake.set()

    async def drain(self) -> None:
        """Flush everything queued, wait for in-flight batches, stop the loop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until nothing is queued or running (tests, demo shutdown)."""
        await self._idle.wait()
