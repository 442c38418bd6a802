"""One immutable copy of what the engine counted and where it stands.

Observers (Prometheus, ``$SRV.STATS``/``autoglm status``, health, a monitor
page) read a :class:`Snapshot` that the engine takes on request, never the
engine's attributes: they cannot change the engine, and what they show is
consistent within one reading (taken on the event loop, in one step).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.observe.stats import EngineStats, Histogram
from engine.transport.base import TransportState


@dataclass(frozen=True, slots=True)
class VariantState:
    """One loaded model of a route (its A/B variant, or its only one, named ``""``)."""

    name: str
    processor: str
    model: str
    version: str
    shadow: bool
    device: str
    dtype: str
    load_s: float
    events: int
    errors: int
    #: Prepare + run, summed over its events.
    seconds: float
    #: Shadow only: events compared with the live features, and their summed cosine distance.
    compared: int = 0
    distance: float = 0.0


def model_row(route: str, v: VariantState) -> dict[str, Any]:
    """One loaded model as ``$SRV.STATS`` reports it (``autoglm models``, ``autoglm ab report``)."""
    return {
        "route": route,
        "variant": v.name,
        "processor": v.processor,
        "model": v.model,
        "version": v.version,
        "role": "shadow" if v.shadow else "live",
        "device": v.device,
        "dtype": v.dtype,
        "load_s": round(v.load_s, 3),
        "events": v.events,
        "errors": v.errors,
        "seconds": round(v.seconds, 6),
        "compared": v.compared,
        "distance": round(v.distance, 6),
    }


@dataclass(frozen=True, slots=True)
class RouteState:
    """One route's batching, by ``<modality>:<processor>``."""

    name: str
    #: Batch size -> batches of that size.
    sizes: Mapping[int, int]
    items: int
    wait: Histogram
    depth: int
    dropped: int
    #: The processor's internal faults that cost no event, by kind.
    faults: Mapping[str, int] = field(default_factory=dict)
    #: What the processor did beside its features, by kind (``reused`` embeddings).
    counters: Mapping[str, int] = field(default_factory=dict)
    variants: tuple[VariantState, ...] = ()

    @property
    def mean_batch(self) -> float:
        batches = sum(self.sizes.values())
        return self.items / batches if batches else 0.0


@dataclass(frozen=True, slots=True)
class GLMState:
    backend: str
    calls: int
    errors: int
    answered: int
    skipped: Mapping[str, int]
    queued: int
    breaker: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything an observer may read, copied at one moment."""

    prefix: str
    stats: EngineStats
    #: ``(modality, outcome) -> events`` over every source.
    aligner: Mapping[tuple[str, str], int]
    #: source -> its aligner outcomes (only with ``metrics.per_source``).
    per_source: Mapping[str, Mapping[tuple[str, str], int]]
    open_windows: int
    routes: tuple[RouteState, ...]
    glm: GLMState
    transport: TransportState
    #: The supervisor's report: ``status`` (ok/degraded/unhealthy) and why.
    health: Mapping[str, Any]
    #: The configuration that runs (a frozen model), as JSON.
    config_json: str
    per_source_metrics: bool = False
    #: Every partition of the configuration (``"0"`` .. ``"N-1"``, and with
    #: ``N > 1`` ``"rest"``); empty in core mode, which has no leases. Lets an
    #: observer tell a partition nobody owns from one this worker does not.
    slots: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        return str(self.health.get("status", "unhealthy"))

    def summary(self) -> dict[str, Any]:
        """What ``$SRV.STATS`` and ``autoglm status`` show for one engine."""
        t = self.transport
        return {
            **self.health,
            **self.stats.as_dict(),
            "batches": {
                r.name: {
                    "batches": sum(r.sizes.values()),
                    "mean_size": round(r.mean_batch, 2),
                    "sizes": {str(k): v for k, v in sorted(r.sizes.items())},
                    "queue": r.depth,
                }
                for r in self.routes
            },
            "models": [model_row(r.name, v) for r in self.routes for v in r.variants],
            "glm": {
                "backend": self.glm.backend,
                "calls": self.glm.calls,
                "errors": self.glm.errors,
                "skipped": dict(self.glm.skipped),
                "breaker": self.glm.breaker,
                "queued": self.glm.queued,
            },
            "durable": t.durable,
            "unacked": t.unacked,
            "jetstream": {
                "redelivered": t.redelivered,
                "poisoned": t.poisoned,
                "recovered": t.recovered,
                "results_duplicate": t.results_duplicate,
            }
            if t.durable
            else None,
            "stalled": t.stalled,
            **self.ownership(),
        }

    def ownership(self) -> dict[str, Any]:
        """This worker's share (durable mode): its name, the partitions it owns
        with each one's lag (inputs waiting or unacked), the live workers it
        sees in the leases bucket, and how often a partition came or went."""
        t = self.transport
        if not t.worker:
            return {"worker": None}
        return {
            "worker": t.worker,
            "partitions": list(t.partitions),
            "lag": dict(t.lag),
            "workers": list(t.workers),
            "moves": t.moves,
            "slots": list(self.slots),
        }


def copy_stats(stats: EngineStats) -> EngineStats:
    """A deep copy: the counters go on changing after the snapshot."""
    return copy.deepcopy(stats)


def copy_counts(counts: Mapping[Any, int]) -> Counter[Any]:
    return Counter(counts)
