"""Intake overload policies per route (real_time / complete) in both transports,
and what only JetStream has: the max_ack_pending stall report, a full input stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from engine.contracts.types import Features, InputEvent, Modality
from engine.runtime.engine import Engine
from processors.params import PassthroughParams
from processors.registry import ProcessorSpec
from tests.conftest import Transport, collect, make_config, send, srv_stats, stats_when

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


@pytest.fixture(autouse=True)
def busy(use_processor: Callable[[ProcessorSpec], None]) -> None:
    use_processor(ProcessorSpec("test-busy", None, PassthroughParams, "tests.test_intake:make_busy"))


def route(intake: str, **extra: Any) -> dict[str, Any]:
    return {
        "modality": "image",
        "processor": "test-busy",
        "intake": intake,
        "batch": {"max_batch_size": 1, "max_wait_ms": 0, "max_queue": 8},
        **extra,
    }


async def stream(nc: Any, prefix: str, n: int, gap_s: float) -> set[str]:
    """n frames at a live pace, stamped with the time they are sent (the pace is
    what the test offers the route, not a wait for the engine)."""
    sent = set()
    for i in range(n):
        eid = f"f{i}"
        sent.add(eid)
        await send(nc, prefix, "cam", "image", b"frame", time.time_ns(), event_id=eid)
        await asyncio.sleep(gap_s)
    await nc.flush()
    return sent


async def run(
    nc: Any, nats_url: str, prefix: str, transport: Transport, rt: dict[str, Any], n: int
) -> tuple[Engine, dict[str, Any], Any, Any, set[str]]:
    """Stream n frames through one route; the engine (stopped), its counters as
    ``$SRV.STATS`` gave them before the stop, results, DLQ records, the sent ids."""
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    cfg = transport.config(prefix, routes=[rt], aligner={"window_ms": 50, "idle_timeout_ms": 200})
    engine = Engine(cfg)
    await engine.start(nats_url)
    sent = await stream(nc, prefix, n, 0.004)  # 250 frames/s offered, 50/s possible
    await out.wait_until(
        lambda: set(out.event_ids()) | {r["event_id"] for _, _, r in dlq.items} >= sent,
        "every frame in a result (fused or skipped) or a DLQ record",
        timeout=30,
    )
    stats = await srv_stats(nc, prefix)
    await engine.stop()
    return engine, stats, out, dlq, sent


def fused_ids(out: Any) -> set[str]:
    return {e for _, _, r in out.items for ids in r["events"].values() for e in ids}


async def test_real_time_skips_stale_frames_and_keeps_latency_flat(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    rt = route("real_time", max_staleness_ms=150)
    rt["batch"]["max_queue"] = 1000  # so staleness, not the queue, is what skips
    engine, stats, out, dlq, sent = await run(nc, nats_url, prefix, transport, rt, 150)
    stale = stats["stale"]["image"]
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


async def test_complete_skips_nothing_and_holds_intake_back(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    engine, stats, out, dlq, sent = await run(nc, nats_url, prefix, transport, route("complete"), 60)
    assert fused_ids(out) == sent and not dlq.items  # nothing dropped, nothing stale
    assert stats["intake_waits"] > 0 and not stats["stale"]
    assert engine.routes[0].batcher.stats.dropped == 0


async def test_max_ack_pending_stall_is_reported_and_clears(
    nc: Any, nats_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """JetStream only: core NATS has no acks to wait for."""
    caplog.set_level(logging.WARNING, logger="autoglm.durable")
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    cfg = make_config(
        prefix,
        nats={"subject_prefix": prefix, "durable": True, "max_ack_pending": 5},
        aligner={"window_ms": 60_000, "idle_timeout_ms": 400},
    )
    engine = Engine(cfg)
    await engine.start(nats_url)
    base = time.time_ns()
    sent = set()
    for i in range(12):  # one long window: nothing can be acked until it closes
        sent.add(f"w{i}")
        await send(nc, prefix, "cam", "text", b"x", base + i * MS, event_id=f"w{i}")
    await nc.flush()
    # The idle close publishes the first five, their acks free room and the
    # rest flows — into a window that has closed: what a too-small
    # max_ack_pending costs, each one refused as too_late, none lost.
    late = await dlq.wait_for(7)
    await stats_when(nc, prefix, lambda s: not s["stalled"], "the stall to clear")
    await engine.stop()
    assert fused_ids(out) | {r["event_id"] for r in late} == sent
    assert {r["reason"] for r in late} == {"too_late"}
    said = [r.getMessage() for r in caplog.records if r.name == "autoglm.durable"]
    assert sum(m.startswith("intake stalled: 5 events held") for m in said) == 1, said  # once per stall
    assert any(m.startswith("intake resumed after a") for m in said), said


async def test_a_full_input_stream_refuses_new_events_and_keeps_every_accepted_one(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """JetStream only: the input stream's limit is what refuses."""
    out = await collect(nc, f"{prefix}.out.>")
    cfg = make_config(prefix, nats={"subject_prefix": prefix, "durable": True, "stream_max_bytes": 20_000})
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
    await out.wait_events(accepted)  # none of the accepted ones was discarded to make room
    await engine.stop()
    assert fused_ids(out) == accepted
