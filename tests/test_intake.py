"""Intake overload policies per route (real_time / complete) and the max_ack_pending stall report."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from engine.contracts.types import Features, InputEvent, Modality
from engine.runtime.engine import Engine
from processors.params import PassthroughParams
from processors.registry import ProcessorSpec, register
from tests.conftest import collect, make_config, send

MS = 1_000_000


class Busy:
    """20 ms per batch, whatever its size: a machine too slow for one-by-one work."""

    def __init__(self, modality: Modality) -> None:
        self.modality = modality

    def prepare(self, event: InputEvent) -> int:
        return len(event.payload)

    def run(self, items: Sequence[int]) -> list[Features]:
        time.sleep(0.02)
        return [Features(self.modality, stats={"bytes": float(n)}) for n in items]


def make_busy(params: PassthroughParams, modality: Modality, device: str, dtype: str) -> Busy:
    return Busy(modality)


register(ProcessorSpec("test-busy", None, PassthroughParams, "tests.test_intake:make_busy"))


def route(intake: str, **extra: Any) -> dict[str, Any]:
    return {
        "modality": "image",
        "processor": "test-busy",
        "intake": intake,
        "batch": {"max_batch_size": 1, "max_wait_ms": 0, "max_queue": 8},
        **extra,
    }


async def stream(nc: Any, prefix: str, n: int, gap_s: float) -> set[str]:
    """n frames at a live pace, stamped with the time they are sent."""
    sent = set()
    for i in range(n):
        eid = f"f{i}"
        sent.add(eid)
        await send(nc, prefix, "cam", "image", b"frame", time.time_ns(), event_id=eid)
        await asyncio.sleep(gap_s)
    await nc.flush()
    return sent


async def run(
    nc: Any, nats_url: str, prefix: str, rt: dict[str, Any], n: int
) -> tuple[Engine, Any, Any, set[str]]:
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    cfg = make_config(prefix, routes=[rt], aligner={"window_ms": 50, "idle_timeout_ms": 200})
    engine = Engine(cfg)
    await engine.start(nats_url)
    sent = await stream(nc, prefix, n, 0.004)  # 250 frames/s offered, 50/s possible
    await out.wait_until(
        lambda: set(out.event_ids()) | {r["event_id"] for _, _, r in dlq.items} >= sent,
        "every frame in a result (fused or skipped) or a DLQ record",
        timeout=30,
    )
    await engine.stop()
    return engine, out, dlq, sent


def fused_ids(out: Any) -> set[str]:
    return {e for _, _, r in out.items for ids in r["events"].values() for e in ids}


async def test_real_time_skips_stale_frames_and_keeps_latency_flat(
    nc: Any, nats_url: str, prefix: str
) -> None:
    rt = route("real_time", max_staleness_ms=150)
    rt["batch"]["max_queue"] = 1000  # so staleness, not the queue, is what skips
    engine, out, dlq, sent = await run(nc, nats_url, prefix, rt, 150)
    stale = engine.stats.stale["image"]
    fused = fused_ids(out)
    assert stale > 0, "5x the processor's rate must leave frames behind"
    assert len(fused) + stale == len(sent) and fused <= sent  # every frame: a result or counted as stale
    assert not dlq.items  # skipping is a counter, not a DLQ record per frame
    # ... and each skipped frame is named in the result of its window
    listed = [e for _, _, r in out.items for e in (r.get("skipped") or {}).get("stale", [])]
    assert len(listed) == stale and set(listed) == sent - fused
    assert engine.aligner.counts[("image", "stale")] == stale
    # a frame that was processed was at most max_staleness old when it started
    worst = max(r["latency_ms"]["event_to_result"] for _, _, r in out.items)
    assert worst < 700, worst  # staleness + idle close + slack, not the 2.4 s backlog of "complete"


async def test_complete_skips_nothing_and_holds_intake_back(nc: Any, nats_url: str, prefix: str) -> None:
    engine, out, dlq, sent = await run(nc, nats_url, prefix, route("complete"), 60)
    assert fused_ids(out) == sent and not dlq.items  # nothing dropped, nothing stale
    assert engine.stats.intake_waits > 0 and not engine.stats.stale
    assert engine.routes[0].batcher.stats.dropped == 0


async def test_max_ack_pending_stall_is_reported_and_clears(nc: Any, nats_url: str, prefix: str) -> None:
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    cfg = make_config(
        prefix,
        nats={"subject_prefix": prefix, "max_ack_pending": 5},
        aligner={"window_ms": 60_000, "idle_timeout_ms": 400},
    )
    engine = Engine(cfg)
    await engine.start(nats_url)
    assert engine.transport is not None and engine.transport.durable
    base = time.time_ns()
    sent = set()
    for i in range(12):  # one long window: nothing can be acked until it closes
        sent.add(f"w{i}")
        await send(nc, prefix, "cam", "text", b"x", base + i * MS, event_id=f"w{i}")
    await nc.flush()
    await asyncio.sleep(0.3)
    assert engine.transport.stalled_since is not None and engine.transport.stalls == 1
    # The idle close publishes the first five, their acks free room and the
    # rest flows — into a window that has closed: what a too-small
    # max_ack_pending costs, each one refused as too_late, none lost.
    late = await dlq.wait_for(7)
    await engine.stop()
    assert fused_ids(out) | {r["event_id"] for r in late} == sent
    assert {r["reason"] for r in late} == {"too_late"}
    assert engine.transport.stalled_since is None and engine.transport.stalls == 1


async def test_a_full_input_stream_refuses_new_events_and_keeps_every_accepted_one(
    nc: Any, nats_url: str, prefix: str
) -> None:
    out = await collect(nc, f"{prefix}.out.>")
    cfg = make_config(prefix, nats={"subject_prefix": prefix, "stream_max_bytes": 20_000})
    engine = Engine(cfg)
    await engine.start(nats_url)  # makes the streams
    await engine.stop()  # and is away while the producer keeps sending
    js = nc.jetstream()
    accepted, refused = set(), 0
    base = time.time_ns()
    for i in range(100):
        hdrs = {"AutoGLM-Timestamp": str(base + i * MS), "Content-Type": "text/plain", "Nats-Msg-Id": f"x{i}"}
        try:
            await js.publish(f"{prefix}.in.cam.text", b"y" * 500, headers=hdrs)
            accepted.add(f"x{i}")
        except Exception as exc:  # nats: maximum bytes exceeded
            assert "maximum bytes exceeded" in str(exc)
            refused += 1
    assert refused and accepted  # the producer was held back, told by its PubAck
    engine = Engine(cfg)
    await engine.start(nats_url)
    await asyncio.sleep(1.0)
    await engine.stop()
    assert fused_ids(out) == accepted  # none of the accepted ones was discarded to make room
