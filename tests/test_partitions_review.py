"""Review of the scale-out work (issue 14): ways to lose or duplicate data
across workers, each a test that fails while the problem is there."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from engine.runtime.engine import Engine
from processors.params import PassthroughParams
from processors.registry import ProcessorSpec
from tests.conftest import collect, make_config, send
from tests.test_partitions import SOURCES

MS = 1_000_000


async def test_a_full_queue_parks_one_event_at_a_time_whatever_the_partitions(
    nc: Any, nats_url: str, prefix: str, use_processor: Callable[[ProcessorSpec], None]
) -> None:
    """A ``complete`` route whose queue is full parks the event it could not
    queue, and the intake waits for room. With partitions, each owned partition
    has a fetch loop of its own: a second loop's event must not be received
    (admitted, then parked over the first one) while one is parked. An event
    parked over is admitted but never processed: its window never closes, the
    source's later windows wait behind it, and a handover of its partition
    waits for it forever."""
    use_processor(ProcessorSpec("test-busy", None, PassthroughParams, "tests.test_intake:make_busy"))
    cfg = make_config(
        prefix,
        nats={"subject_prefix": prefix, "durable": True, "partitions": 4, "lease_s": 1.0},
        routes=[
            {
                "modality": "image",
                "processor": "test-busy",
                "intake": "complete",
                "batch": {"max_batch_size": 1, "max_wait_ms": 0, "max_queue": 1},
            }
        ],
        aligner={"window_ms": 100, "allowed_lateness_ms": 0, "idle_timeout_ms": 300},
    )
    out = await collect(nc, f"{prefix}.out.>")
    engine = Engine(cfg)
    await engine.start(nats_url)
    try:
        sent = set()
        base = time.time_ns()
        for i in range(3):
            for source in SOURCES[:16]:  # every partition has some
                eid = f"{source}-{i}"
                sent.add(eid)
                await send(nc, prefix, source, "image", b"frame", base + i * 20 * MS, event_id=eid)
        await nc.flush()
        await out.wait_events(sent, timeout=30)
        fused = [e for _, _, r in out.items for group in r["events"].values() for e in group]
        assert sorted(fused) == sorted(sent)
    finally:
        await engine.stop()
