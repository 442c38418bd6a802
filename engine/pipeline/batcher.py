"""Dynamic micro-batching that knows nothing about models.

:class:`Batcher` is the pure policy: a bounded FIFO that says when a batch is
due (``max_batch_size`` items waiting, or ``max_wait`` since the oldest one
arrived) given the time you pass in, so it is tested with a hand-moved clock.
The pipeline takes at most ``workers`` batches per route at a time: while
every worker is busy the queue grows, so batches get bigger exactly when the
machine is behind.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from engine.contracts.errors import BackpressureError, ProcessorError
from engine.contracts.types import Nanos
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
