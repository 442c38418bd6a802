"""The Prometheus endpoint reports what the engine did, with bounded labels."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from engine.contracts.subjects import partition_of
from engine.runtime.engine import Engine
from tests.conftest import collect, eventually, make_config, send

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
MOVES = ("autoglm_partition_moves_total", ())
WORKERS = ("autoglm_workers", ())


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape_when(port: int, done: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until the samples satisfy ``done`` (the counters follow the events
    asynchronously: acks, for one, come after the result was stored)."""

    async def check() -> Samples | None:
        m = await asyncio.to_thread(scrape, port)
        return m if done(m) else None

    found: Samples = await eventually(check, what)
    return found


async def test_metrics_endpoint_counts_events_rejections_batches_and_latency(
    nc: Any, nats_url: str, prefix: str
) -> None:
    cfg = make_config(prefix, nats={"durable": True}, metrics={"port": 0}, aligner={"idle_timeout_ms": 200})
    engine = Engine(cfg)  # durable: the JetStream series too
    await engine.start(nats_url)
    assert engine.metrics is not None
    base = time.time_ns()
    for i in range(10):
        await send(nc, prefix, f"cam{i % 2}", "text", b"ok", base + i * 1_000_000, event_id=f"e{i}")
    await send(nc, prefix, "cam0", "text", b"x", base, content_type="video/mp4", event_id="bad")
    await nc.flush()
    fused = ("autoglm_aligner_outcomes_total", (("modality", "text"), ("outcome", "fused")))
    m = await scrape_when(
        engine.metrics.port,
        lambda m: m.get(fused) == 10 and m.get(("autoglm_jetstream_unacked", ())) == 0,
        "ten events fused and every input acked",
    )
    await engine.stop()
    assert m[("autoglm_events_received_total", (("modality", "text"),))] == 11
    assert (
        m[("autoglm_events_rejected_total", (("modality", "text"), ("reason", "unsupported_content_type")))]
        == 1
    )
    assert m[("autoglm_aligner_outcomes_total", (("modality", "text"), ("outcome", "fused")))] == 10
    assert m[("autoglm_results_total", ())] >= 2
    assert m[("autoglm_batch_size_count", (("route", "text:passthrough"),))] >= 1
    assert m[("autoglm_batch_size_sum", (("route", "text:passthrough"),))] == 10
    for stage in ("decode", "model", "process", "align", "publish", "event_to_result"):
        assert m[("autoglm_stage_latency_seconds_count", (("stage", stage),))] >= 1, stage
    assert m[("autoglm_glm_breaker_open", ())] == 0.0
    assert m[("autoglm_jetstream_unacked", ())] == 0
    assert not any("source" in dict(labels) for _, labels in m)  # no per-source labels by default


async def test_per_source_series_only_when_asked(nc: Any, nats_url: str, prefix: str) -> None:
    engine = Engine(make_config(prefix, metrics={"port": 0, "per_source": True}))
    await engine.start(nats_url)
    assert engine.metrics is not None
    await send(nc, prefix, "camA", "text", b"ok", time.time_ns(), event_id="a1")
    await nc.flush()
    key = ("autoglm_source_outcomes_total", (("modality", "text"), ("outcome", "fused"), ("source", "camA")))
    m = await scrape_when(engine.metrics.port, lambda m: key in m, "camA's series")
    await engine.stop()
    assert m[key] == 1


async def test_standard_process_and_gc_series_and_a_real_queue_wait_histogram(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """The private registry dropped ``process_*`` and ``python_gc_*``, and queue wait had
    only a ``+Inf`` bucket: no quantile could be drawn from it."""
    results = await collect(nc, f"{prefix}.out.>")
    engine = Engine(make_config(prefix, metrics={"port": 0}, aligner={"idle_timeout_ms": 200}))
    await engine.start(nats_url)
    assert engine.metrics is not None
    base = time.time_ns()
    for i in range(6):
        await send(nc, prefix, "cam", "text", b"ok", base + i * 1_000_000, event_id=f"q{i}")
    await nc.flush()
    n = 1  # wait until the results hold all six: each went through the text route's batcher
    while sum(len(r["events"]["text"]) for r in await results.wait_for(n)) < 6:
        n += 1
    text = await asyncio.to_thread(
        lambda: (
            urllib.request.urlopen(f"http://127.0.0.1:{engine.metrics.port}/metrics", timeout=5)  # type: ignore[union-attr]
            .read()
            .decode()
        )
    )
    await engine.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    assert families["process_cpu_seconds"].samples[0].value > 0
    assert any(
        s.name == "python_gc_objects_collected_total" for s in families["python_gc_objects_collected"].samples
    )
    assert "python_info" in families
    route = {"route": "text:passthrough"}
    buckets = {
        s.labels["le"]: s.value
        for s in families["autoglm_queue_wait_seconds"].samples
        if s.name.endswith("_bucket") and {k: v for k, v in s.labels.items() if k != "le"} == route
    }
    finite = {float(le): n for le, n in buckets.items() if le != "+Inf"}
    assert len(finite) >= 10 and buckets["+Inf"] == 6
    counts = [finite[le] for le in sorted(finite)]
    assert counts == sorted(counts) and counts[-1] == 6  # cumulative, and the finite buckets hold them


async def test_partition_ownership_lag_and_moves_of_two_workers(nc: Any, nats_url: str, prefix: str) -> None:
    """Each worker exports every partition, 1 where it holds the lease: summed
    over the workers each partition is owned once, before and after a join."""
    cfg = make_config(
        prefix,
        nats={"subject_prefix": prefix, "durable": True, "partitions": 4, "lease_s": 1.0},
        metrics={"port": 0},
        aligner={"window_ms": 600_000, "allowed_lateness_ms": 0, "idle_timeout_ms": 600_000},
    )
    slots = ("0", "1", "2", "3", "rest")
    first, second = Engine(cfg), Engine(cfg)
    await first.start(nats_url)
    try:
        assert first.metrics is not None and first.transport is not None
        me = first.transport.state().worker
        part = str(partition_of("cam7", 4))
        for i in range(3):  # held open in their window: the lag of cam7's partition
            await send(nc, prefix, "cam7", "text", b"x", time.time_ns(), event_id=f"m{i}")
        alone = await scrape_when(
            first.metrics.port,
            lambda m: m.get(("autoglm_partition_lag", (("partition", part),))) == 3,
            "three inputs lagging in cam7's partition",
        )
        for p in slots:
            assert alone[("autoglm_partition_owned", (("partition", p), ("worker", me)))] == 1
        assert alone[MOVES] == 5  # took all five
        assert alone[WORKERS] == 1
        await second.start(nats_url)
        assert second.metrics is not None and second.transport is not None
        them = second.transport.state().worker
        ports = (first.metrics.port, second.metrics.port)

        def owned(m: Samples, worker: str) -> dict[str, float | None]:
            return {
                p: m.get(("autoglm_partition_owned", (("partition", p), ("worker", worker)))) for p in slots
            }

        async def shared() -> bool:
            a, b = [await asyncio.to_thread(scrape, port) for port in ports]
            mine, theirs = owned(a, me), owned(b, them)
            once = all({mine[p], theirs[p]} == {0.0, 1.0} for p in slots)
            given = sum(1 for p in slots if theirs[p] == 1.0)
            moved = a.get(MOVES) == 5 + given and b.get(MOVES) == given
            lag = ("autoglm_partition_lag", (("partition", part),))
            held = (a if mine[part] == 1.0 else b).get(lag) == 3  # the handover kept them
            return once and moved and held and a.get(WORKERS) == b.get(WORKERS) == 2

        await eventually(shared, "each partition owned by exactly one of the two workers")
    finally:
        await second.stop()
        await first.stop()
