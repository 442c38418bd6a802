"""Prometheus metrics, read from the engine's own counters at scrape time.

Nothing is recorded twice and the hot path pays nothing for metrics: a custom
collector turns :class:`engine.observe.stats.EngineStats`, the aligner's counters, the
batchers' statistics, the GLM stage, the durable intake and this worker's
partitions into metric families when Prometheus scrapes. Labels stay
bounded: modality, reason, outcome, route, stage, partition (at most
``nats.partitions`` + 1) and worker — no per-source labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from engine.observe.snapshot import RouteState, Snapshot

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
BREAKER = {"closed": 0.0, "half_open": 0.5, "open": 1.0}


def _counter(name: str, doc: str, labels: list[str], counts: Mapping[Any, int]) -> CounterMetricFamily:
    """One labelled counter family from a Counter keyed by a label value or a tuple of them."""
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, n in counts.items():
        family.add_metric(list(key) if isinstance(key, tuple) else [key], n)
    return family


class EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        e = self.snapshot()
        s = e.stats
        yield _counter("autoglm_events_received", "Events that reached the engine", ["modality"], s.received)
        yield _counter(
            "autoglm_events_processed", "Events a processor turned into features", ["modality"], s.processed
        )
        yield _counter(
            "autoglm_events_rejected", "Events refused, by DLQ reason", ["modality", "reason"], s.rejected
        )
        yield _counter(
            "autoglm_aligner_outcomes",
            "Aligner outcomes per event",
            ["modality", "outcome"],
            e.aligner,
        )
        if e.per_source_metrics:
            per = CounterMetricFamily(
                "autoglm_source_outcomes",
                "Aligner outcomes per source",
                labels=["source", "modality", "outcome"],
            )
            for name, counts in e.per_source.items():
                for (mod, outcome), n in counts.items():
                    per.add_metric([name, mod, outcome], n)
            yield per
        yield _counter(
            "autoglm_events_stale", "Events skipped as older than max_staleness_ms", ["modality"], s.stale
        )
        yield CounterMetricFamily(
            "autoglm_intake_waits", "Times intake waited for room (complete policy)", value=s.intake_waits
        )
        yield GaugeMetricFamily(
            "autoglm_up", "1 ok, 0.5 degraded (held up, retrying), 0 unhealthy (a task died)",
            value={"ok": 1.0, "degraded": 0.5}.get(e.status, 0.0),
        )  # fmt: skip
        yield CounterMetricFamily(
            "autoglm_internal_errors", "Messages whose handling hit a bug (internal_error DLQ records)",
            value=s.internal_errors,
        )  # fmt: skip
        yield _counter("autoglm_duplicates", "Events refused as duplicate ids", ["modality"], s.duplicates)
        yield CounterMetricFamily(
            "autoglm_store_retries", "Stores of results/DLQ records retried while JetStream was away",
            value=e.transport.store_retries,
        )  # fmt: skip
        yield CounterMetricFamily("autoglm_results", "Results published", value=s.results)
        yield CounterMetricFamily("autoglm_dlq_records", "DLQ records published", value=s.dlq_published)
        yield CounterMetricFamily(
            "autoglm_slow_consumer", "Messages NATS dropped for us", value=e.transport.slow_consumer
        )
        reloads = CounterMetricFamily(
            "autoglm_reloads", "Hot reloads of the routing file", labels=["outcome"]
        )
        reloads.add_metric(["applied"], s.reloads)
        reloads.add_metric(["refused"], s.reloads_failed)
        yield reloads
        sizes = HistogramMetricFamily("autoglm_batch_size", "Items per processor batch", labels=["route"])
        wait = HistogramMetricFamily(
            "autoglm_queue_wait_seconds", "Time items waited for a batch", labels=["route"]
        )
        depth = GaugeMetricFamily("autoglm_queue_depth", "Items waiting for a batch", labels=["route"])
        dropped = CounterMetricFamily(
            "autoglm_queue_dropped", "Items a full batch queue dropped", labels=["route"]
        )
        for r in e.routes:
            running, buckets = 0, []
            for bound in (*BATCH_BUCKETS, float("inf")):
                running = sum(n for size, n in r.sizes.items() if size <= bound)
                buckets.append(("+Inf" if bound == float("inf") else str(bound), float(running)))
            sizes.add_metric([r.name], buckets, sum_value=float(r.items))
            wait.add_metric([r.name], r.wait.cumulative(), sum_value=r.wait.total)
            depth.add_metric([r.name], r.depth)
            dropped.add_metric([r.name], r.dropped)
        yield from (sizes, wait, depth, dropped)
        latency = HistogramMetricFamily(
            "autoglm_stage_latency_seconds", "Latency per stage of each result", labels=["stage"]
        )
        for stage, hist in s.latency.items():
            latency.add_metric([stage], hist.cumulative(), sum_value=hist.total)
        yield latency
        yield _per_route_kind(
            e,
            "autoglm_processor_faults",
            "Internal processor failures that cost no event (the feature is left out)",
            lambda r: r.faults,
        )
        yield _per_route_kind(
            e,
            "autoglm_processor_events",
            "What processors did beside computing features (reused: a previous embedding reused)",
            lambda r: r.counters,
        )
        yield from model_families(e)
        g = e.glm
        yield CounterMetricFamily("autoglm_glm_calls", "GLM backend calls", value=g.calls)
        yield CounterMetricFamily("autoglm_glm_errors", "GLM calls that failed", value=g.errors)
        yield _counter("autoglm_glm_skipped", "Frames published without a call", ["reason"], g.skipped)
        yield GaugeMetricFamily("autoglm_glm_queue_depth", "Frames waiting for the GLM", value=g.queued)
        yield GaugeMetricFamily(
            "autoglm_glm_breaker_open", "0 closed, 0.5 half open, 1 open", value=BREAKER[g.breaker]
        )
        t = e.transport
        if t.durable:
            yield GaugeMetricFamily(
                "autoglm_jetstream_unacked", "Events held until their result is stored", value=t.unacked
            )
            yield CounterMetricFamily(
                "autoglm_jetstream_redelivered", "Redelivered input messages", value=t.redelivered
            )
            yield CounterMetricFamily("autoglm_jetstream_acked", "Input messages acked", value=t.acked)
            yield CounterMetricFamily(
                "autoglm_jetstream_poisoned", "Inputs given up after nats.max_deliver deliveries",
                value=t.poisoned,
            )  # fmt: skip
            yield CounterMetricFamily(
                "autoglm_jetstream_recovered", "Inputs found already stored after a crash, acked",
                value=t.recovered,
            )  # fmt: skip
            yield GaugeMetricFamily(
                "autoglm_results_unconfirmed", "Results published, PubAck not in yet", value=t.publishing
            )
            yield CounterMetricFamily(
                "autoglm_results_retried",
                "Results stored again after a failed PubAck",
                value=t.results_retried,
            )
            yield CounterMetricFamily(
                "autoglm_results_duplicate",
                "Results the stream already held (same id, so the same events)",
                value=t.results_duplicate,
            )
            yield GaugeMetricFamily(
                "autoglm_jetstream_stalled", "1 while max_ack_pending stops delivery", value=float(t.stalled)
            )
            yield CounterMetricFamily(
                "autoglm_jetstream_stalls", "Times max_ack_pending stopped delivery", value=t.stalls
            )
        if t.worker:
            yield from partition_families(e)


def model_families(e: Snapshot) -> Iterator[Any]:
    """Per loaded model: its identity as an info gauge, and its events, errors
    and seconds labelled by route, A/B variant and version (a handful of series
    per route; the version changes only when the weights do)."""
    labels = ["route", "variant", "processor", "model", "version"]
    info = GaugeMetricFamily(
        "autoglm_model_info",
        "A loaded model (1), with its device, dtype and role",
        labels=[*labels, "device", "dtype", "role"],
    )
    load = GaugeMetricFamily("autoglm_model_load_seconds", "How long the model took to load", labels=labels)
    events = CounterMetricFamily("autoglm_variant_events", "Events a model made features for", labels=labels)
    errors = CounterMetricFamily("autoglm_variant_errors", "Events a model refused or failed", labels=labels)
    seconds = CounterMetricFamily(
        "autoglm_variant_seconds", "Decode + model time, summed over its events", labels=labels
    )
    distance = CounterMetricFamily(
        "autoglm_shadow_distance",
        "Shadow variants: summed cosine distance of their embeddings to the live ones",
        labels=labels,
    )
    compared = CounterMetricFamily(
        "autoglm_shadow_compared", "Shadow variants: events compared with the live features", labels=labels
    )
    for r in e.routes:
        for v in r.variants:
            key = [r.name, v.name, v.processor, v.model, v.version]
            info.add_metric([*key, v.device, v.dtype, "shadow" if v.shadow else "live"], 1)
            load.add_metric(key, v.load_s)
            events.add_metric(key, v.events)
            errors.add_metric(key, v.errors)
            seconds.add_metric(key, v.seconds)
            if v.shadow:
                distance.add_metric(key, v.distance)
                compared.add_metric(key, v.compared)
    yield from (info, load, events, errors, seconds, distance, compared)


def partition_families(e: Snapshot) -> Iterator[Any]:
    """Ownership as each worker sees its own share. Every partition of the
    configuration is exported, 1 where this worker owns it and 0 elsewhere, so
    ``sum by (partition) (autoglm_partition_owned)`` over all workers is 1 for a
    healthy partition, 0 for one nobody owns (a failover under way) and never 2."""
    t = e.transport
    owned = GaugeMetricFamily(
        "autoglm_partition_owned", "1 where this worker holds the partition's lease",
        labels=["partition", "worker"],
    )  # fmt: skip
    mine = set(t.partitions)
    for slot in e.slots or t.partitions:
        owned.add_metric([slot, t.worker], 1.0 if slot in mine else 0.0)
    yield owned
    lag = GaugeMetricFamily(
        "autoglm_partition_lag", "Inputs waiting in an owned partition or unacked (read each lease turn)",
        labels=["partition"],
    )  # fmt: skip
    for slot, n in t.lag:
        lag.add_metric([slot], n)
    yield lag
    yield CounterMetricFamily(
        "autoglm_partition_moves", "Partitions this worker took, handed over or lost", value=t.moves
    )
    yield GaugeMetricFamily(
        "autoglm_workers", "Live workers of this configuration, as the leases bucket says",
        value=len(t.workers),
    )  # fmt: skip


class MetricsServer:
    """``/metrics`` on ``host:port`` in a background thread.

    The registry is the engine's own (two engines in one process, as in the
    tests, must not share series), so the standard ``process_*``,
    ``python_info`` and ``python_gc_*`` collectors are registered on it too."""

    def __init__(self, snapshot: Callable[[], Snapshot], host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(standard)
        self.registry.register(EngineCollector(snapshot))
        self.server, self.thread = start_http_server(port, host, registry=self.registry)
        self.port = int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _per_route_kind(
    e: Snapshot, name: str, doc: str, read: Callable[[RouteState], Mapping[str, int]]
) -> CounterMetricFamily:
    """A counter per route and kind, from what ``read`` gives of each route's state."""
    family = CounterMetricFamily(name, doc, labels=["route", "kind"])
    for r in e.routes:
        for kind, n in read(r).items():
            family.add_metric([r.name, kind], n)
    return family
