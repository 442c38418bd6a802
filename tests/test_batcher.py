"""The micro-batcher, tested without torch and with a hand-moved clock."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.contracts.errors import BackpressureError, ProcessorError
from engine.pipeline.batcher import Batcher, BatchWorker, check_outputs
from tests.conftest import until

MS = 1_000_000


def make(size: int = 4, wait_ms: int = 10, queue: int = 100, overload: str = "drop_oldest") -> Batcher[int]:
    return Batcher(max_batch_size=size, max_wait_ns=wait_ms * MS, max_queue=queue, overload=overload)  # type: ignore[arg-type]


def test_flushes_when_full() -> None:
    b = make(size=3)
    for i in range(3):
        assert b.take(0) == []
        b.offer(i, 0)
    assert b.take(0) == [0, 1, 2]
    assert len(b) == 0


def test_flushes_after_max_wait_from_the_first_item() -> None:
    b = make(size=10, wait_ms=10)
    b.offer(1, 0)
    b.offer(2, 8 * MS)
    assert b.deadline() == 10 * MS
    assert b.take(9 * MS) == []
    assert b.take(10 * MS) == [1, 2]
    assert b.stats.wait_ns_max == 10 * MS
    assert b.stats.wait_ns_total == 10 * MS + 2 * MS


def test_zero_wait_flushes_immediately_and_batches_cap_at_max_size() -> None:
    b = make(size=2, wait_ms=0)
    for i in range(5):
        b.offer(i, 0)
    assert [b.take(0), b.take(0), b.take(0), b.take(0)] == [[0, 1], [2, 3], [4], []]
    assert dict(b.stats.sizes) == {2: 2, 1: 1}
    assert b.stats.mean_batch == pytest.approx(5 / 3)


def test_force_takes_a_partial_batch() -> None:
    b = make(size=10, wait_ms=1000)
    b.offer(1, 0)
    assert b.take(0) == []
    assert b.take(0, force=True) == [1]


def test_drop_oldest_returns_what_it_dropped_and_counts_it() -> None:
    b = make(size=10, queue=2)
    assert b.offer(1, 0) is None
    assert b.offer(2, 0) is None
    assert b.offer(3, 0) == 1
    assert b.stats.dropped == 1
    assert b.take(0, force=True) == [2, 3]


def test_reject_new_raises_and_keeps_the_queue() -> None:
    b = make(size=10, queue=1, overload="reject_new")
    b.offer(1, 0)
    with pytest.raises(BackpressureError, match="queue full"):
        b.offer(2, 0)
    assert b.stats.rejected == 1
    assert b.take(0, force=True) == [1]


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        make(size=0)


def test_output_count_must_match() -> None:
    check_outputs([1, 2], ["a", "b"], "f")
    with pytest.raises(ProcessorError, match="returned 1 outputs for 2 inputs"):
        check_outputs([1, 2], ["a"], "f")


async def test_worker_batches_under_load_and_drains() -> None:
    seen: list[list[int]] = []
    gate = asyncio.Event()
    running = most = 0
    turned = asyncio.Event()

    def clock() -> int:  # read by submit and at the top of each turn of the worker's loop
        turned.set()
        return time.monotonic_ns()

    async def run(batch: list[int]) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        seen.append(batch)
        await gate.wait()
        running -= 1

    async def on_error(batch: list[int], exc: BaseException) -> None:
        raise AssertionError(exc)

    worker = BatchWorker(make(size=4, wait_ms=1), run, on_error, concurrency=1, clock=clock)
    worker.start()
    worker.submit(0)
    await until(lambda: seen == [[0]], "the first batch, alone (max_wait)")
    for i in range(1, 7):  # a full batch and a partial one queue behind the busy slot
        worker.submit(i)
    turned.clear()
    # The worker takes a turn with them queued and its only slot busy; a batch it
    # launched there would start before [0] could finish (the gate opens after).
    await asyncio.wait_for(turned.wait(), 10)
    gate.set()
    await worker.drain()
    assert most == 1  # nothing else started while the only slot was busy
    assert seen == [[0], [1, 2, 3, 4], [5, 6]]


async def test_worker_hands_failures_to_on_error() -> None:
    failed: list[tuple[list[int], str]] = []

    async def run(batch: list[int]) -> None:
        raise RuntimeError("boom")

    async def on_error(batch: list[int], exc: BaseException) -> None:
        failed.append((batch, str(exc)))

    worker = BatchWorker(make(size=2, wait_ms=0), run, on_error)
    worker.start()
    worker.submit(1)
    worker.submit(2)
    await worker.drain()
    assert failed == [([1, 2], "boom")]  # both queued before the loop first ran
