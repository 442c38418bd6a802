"""Counters of everything the engine did and refused, for the summary and tests."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EngineStats:
    """Every event that reached the engine ends in exactly one of: fused into a
    published result, rejected (a DLQ record, by reason), rate-limited, or
    dropped by the aligner's ``on_missing = "drop"``."""

    received: Counter[str] = field(default_factory=Counter)
    processed: Counter[str] = field(default_factory=Counter)
    #: (modality or "?", reason) -> count; each also got a DLQ record.
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)
    rate_limited: Counter[str] = field(default_factory=Counter)
    results: int = 0
    results_events: Counter[str] = field(default_factory=Counter)
    dlq_published: int = 0
    #: Messages nats-py dropped because we fell behind (slow consumer).
    slow_consumer: int = 0
    batch_errors: int = 0
    emit_errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": dict(self.received),
            "processed": dict(self.processed),
            "rejected": {f"{m}:{r}": n for (m, r), n in sorted(self.rejected.items())},
            "rate_limited": dict(self.rate_limited),
            "results": self.results,
            "results_events": dict(self.results_events),
            "dlq_published": self.dlq_published,
            "slow_consumer": self.slow_consumer,
            "batch_errors": self.batch_errors,
            "emit_errors": self.emit_errors,
        }
