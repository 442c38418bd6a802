"""A route's A/B variants: which one a source sees, and what each one did.

A route with ``variants`` loads one processor per variant. Each source is
assigned to one *live* variant by a stable hash: the sha256 of the route's
``experiment`` seed and the source name gives the source a point in [0, 1),
and the live variants cut [0, 1) into consecutive spans by weight. So a
source always sees the same variant, the split follows the weights, and a
reload that changes weights (or adds a variant) moves exactly the sources
whose point now falls in another variant's span.
A *shadow* variant owns no span: it runs on every event of the route beside
the live one, its features compared with the live ones and then dropped.

A route without variants has one, named ``""``: the same code path.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.contracts.types import Features, ModelVersion, Processor
from engine.contracts.versions import weights_version
from engine.observe.snapshot import VariantState

#: Sources whose assignment is remembered (a hash per new source beyond it).
_CACHE = 100_000


def point(experiment: str, source: str) -> float:
    """The source's place in [0, 1) for ``experiment``: the same on every worker, every run."""
    digest = hashlib.sha256(f"{experiment}\x00{source}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass
class Variant:
    """One loaded arm of a route, and its counters (read by the metrics)."""

    name: str
    weight: float
    processor: Processor[Any]
    model: ModelVersion
    shadow: bool = False
    device: str = ""
    dtype: str = ""
    load_s: float = 0.0
    #: What it was loaded from (processor, params, modality, device, dtype):
    #: a reload reuses a loaded model with the same key.
    key: str = ""
    #: Events it made features for, events it failed, seconds of prepare + run.
    events: int = 0
    errors: int = 0
    seconds: float = 0.0
    #: Shadow only: events compared with the live features, and the sum of
    #: their cosine distances (embedding against embedding).
    compared: int = 0
    distance: float = 0.0
    #: A route with ``workers > 1`` runs batches on several threads at once.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(
        self, events: int, errors: int, seconds: float, compared: int = 0, distance: float = 0.0
    ) -> None:
        """Add one batch's figures (one lock per batch, not per event)."""
        with self._lock:
            self.events += events
            self.errors += errors
            self.seconds += seconds
            self.compared += compared
            self.distance += distance

    def weights_changed(self) -> bool:
        """Its weight files no longer hold the bytes it was loaded from (new
        weights dropped in place: same path, same config). Digests are cached
        while a file's size and mtime hold, so an unchanged model costs a stat.
        Raises :class:`ConfigError` when a file cannot be read."""
        files = getattr(self.processor, "weight_files", None) or ()
        return bool(files) and weights_version(list(files)) != self.model.version

    def state(self) -> VariantState:
        """A copy for observers (the counters are written by worker threads)."""
        m = self.model
        return VariantState(
            self.name, m.processor, m.model, m.version, self.shadow, self.device, self.dtype,
            self.load_s, self.events, self.errors, self.seconds, self.compared, self.distance,
        )  # fmt: skip


@dataclass
class Assignment:
    """Source -> live variant, by :func:`point` (remembered per source)."""

    experiment: str
    live: Sequence[Variant]
    _bounds: list[float] = field(default_factory=list)
    _seen: dict[str, Variant] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Scaled by the largest first: weights near the float maximum must not
        # sum to inf (inf / inf is NaN, and NaN bounds would send every source
        # to the last variant).
        top = max((v.weight for v in self.live), default=0.0)
        scaled = [v.weight / top if 0 < top < math.inf else 1.0 for v in self.live]
        total = sum(scaled)
        running = 0.0
        for w in scaled:
            running += w / total
            self._bounds.append(running)
        self._bounds[-1] = math.inf  # rounding never leaves a point past the last span

    def of(self, source: str) -> Variant:
        variant = self._seen.get(source)
        if variant is None:
            p = point(self.experiment, source)
            variant = next(v for v, b in zip(self.live, self._bounds, strict=True) if p < b)
            if len(self._seen) >= _CACHE:
                self._seen.clear()
            self._seen[source] = variant
        return variant


def cosine_distance(a: Features, b: Features) -> float | None:
    """1 - cosine similarity of two features' embeddings (``None``: either has none,
    or their sizes differ: a shadow with another model family is not compared)."""
    x, y = a.embedding, b.embedding
    if x is None or y is None or x.shape != y.shape:
        return None
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 or ny == 0.0:
        return None
    return 1.0 - float(np.dot(x, y)) / (nx * ny)
