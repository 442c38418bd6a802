"""Counters of everything the engine did and refused, for the summary and tests."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: Upper bounds (seconds) of the stage-latency histograms.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Upper bounds (seconds) of the time an item waits for its batch: ``max_wait_ms``
#: is a few milliseconds, a backlog makes it seconds.
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    """Fixed buckets, filled on the event loop; read by the metrics endpoint."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    #: One count per bound, then the +Inf bucket (sized from ``bounds`` when empty).
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.n += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


@dataclass
class EngineStats:
    """Every event that reached the engine ends in exactly one of: fused into a
    published result, rejected (a DLQ record, by reason), rate-limited,
    skipped as stale (``real_time`` routes), or dropped by the aligner's
    ``on_missing = "drop"``."""

    received: Counter[str] = field(default_factory=Counter)
    processed: Counter[str] = field(default_factory=Counter)
    #: (modality or "?", reason) -> count; each also got a DLQ record.
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)
    rate_limited: Counter[str] = field(default_factory=Counter)
    #: ``real_time`` routes: events skipped as older than max_staleness_ms.
    stale: Counter[str] = field(default_factory=Counter)
    #: ``complete`` routes: times intake waited for room in a batch queue.
    intake_waits: int = 0
    results: int = 0
    results_events: Counter[str] = field(default_factory=Counter)
    dlq_published: int = 0
    #: Messages nats-py dropped because we fell behind (slow consumer).
    slow_consumer: int = 0
    batch_errors: int = 0
    emit_errors: int = 0
    #: Messages whose handling raised something other than a refusal
    #: (each got an ``internal_error`` DLQ record).
    internal_errors: int = 0
    #: Events refused as ``duplicate`` (an id already in an open window): two
    #: producers numbering alike, or one resending.
    duplicates: Counter[str] = field(default_factory=Counter)
    #: Stores of results/DLQ records retried while JetStream was away.
    store_retries: int = 0
    #: Hot reloads applied, and refused (invalid file or a model that failed to load).
    reloads: int = 0
    reloads_failed: int = 0
    #: Per stage (process, align, glm, event_to_result) latency of each result.
    latency: dict[str, Histogram] = field(default_factory=dict)

    def observe(self, stage: str, seconds: float) -> None:
        hist = self.latency.get(stage)
        if hist is None:
            hist = self.latency[stage] = Histogram()
        hist.observe(seconds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": dict(self.received),
            "processed": dict(self.processed),
            "rejected": {f"{m}:{r}": n for (m, r), n in sorted(self.rejected.items())},
            "rate_limited": dict(self.rate_limited),
            "stale": dict(self.stale),
            "intake_waits": self.intake_waits,
            "results": self.results,
            "results_events": dict(self.results_events),
            "dlq_published": self.dlq_published,
            "slow_consumer": self.slow_consumer,
            "batch_errors": self.batch_errors,
            "emit_errors": self.emit_errors,
            "internal_errors": self.internal_errors,
            "duplicates": dict(self.duplicates),
            "store_retries": self.store_retries,
            "reloads": self.reloads,
            "reloads_failed": self.reloads_failed,
        }
