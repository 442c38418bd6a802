"""Routes: which processor (and batcher) an event goes to, and its rate control."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.contracts.errors import EventRejected
from engine.contracts.types import Features, InputEvent, Nanos, Processor
from engine.pipeline.batcher import Batcher, check_outputs

if TYPE_CHECKING:
    from engine.config.models import RouteConfig

Outcome = Features | EventRejected


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: ``*`` is one token, a final ``>`` is one or more."""
    pt, st = pattern.split("."), subject.split(".")
    for i, p in enumerate(pt):
        if p == ">":
            return len(st) > i
        if i >= len(st) or (p != "*" and p != st[i]):
            return False
    return len(pt) == len(st)


class RateLimiter:
    """At most ``max_per_s`` events per source by *event* time (GCRA, burst 1).

    Half an interval of jitter is tolerated so a 30 fps camera with a noisy
    clock is not trimmed, while the long-run rate never exceeds the limit.
    """

    def __init__(self, max_per_s: float, max_sources: int = 100_000) -> None:
        self.interval = int(1e9 / max_per_s)
        self._tolerance = self.interval // 2
        self._tat: OrderedDict[str, Nanos] = OrderedDict()
        self._max_sources = max_sources

    def allow(self, source: str, ts: Nanos) -> bool:
        tat = self._tat.get(source)
        if tat is not None and ts < tat - self._tolerance:
            return False
        self._tat[source] = max(tat or ts, ts) + self.interval
        self._tat.move_to_end(source)
        if len(self._tat) > self._max_sources:
            self._tat.popitem(last=False)
        return True


@dataclass
class Route:
    """A live route: its config, processor instance, batcher and rate limiter."""

    name: str
    config: RouteConfig
    processor: Processor[Any]
    batcher: Batcher[InputEvent]
    limiter: RateLimiter | None = field(default=None)
    #: Threads that run ``prepare`` (decode) for the items of one batch in
    #: parallel: OpenCV and numpy release the GIL, so decode scales with cores.
    prepare_pool: ThreadPoolExecutor | None = field(default=None)
    #: (decode seconds, model seconds) of each batch, for the stage histograms.
    timings: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=1024))

    def __post_init__(self) -> None:
        max_fps = getattr(self.processor, "max_fps", None)
        if self.limiter is None and isinstance(max_fps, int | float) and max_fps > 0:
            self.limiter = RateLimiter(float(max_fps))
        if self.prepare_pool is None and self.config.prepare_threads > 1:
            self.prepare_pool = ThreadPoolExecutor(
                self.config.prepare_threads, thread_name_prefix=f"autoglm-prepare-{self.name}"
            )

    def close(self) -> None:
        if self.prepare_pool is not None:
            self.prepare_pool.shutdown(wait=True)

    def matches(self, event: InputEvent) -> bool:
        if event.modality != self.config.modality:
            return False
        return self.config.subject is None or subject_matches(self.config.subject, event.subject)

    def process(self, events: Sequence[InputEvent]) -> list[Outcome]:
        """Prepare each event, run the valid ones as one batch (worker thread).

        A bad event becomes its own :class:`EventRejected`; the rest of the
        batch still runs. If ``run`` itself fails the exception propagates
        and the caller rejects the whole batch with ``processor_error``.
        """
        out: list[Outcome | None] = [None] * len(events)
        ready: list[Any] = []
        index: list[int] = []
        t0 = time.perf_counter()
        if self.prepare_pool is not None and len(events) > 1:
            prepared = list(self.prepare_pool.map(self._prepare, events))
        else:
            prepared = [self._prepare(ev) for ev in events]
        for i, item in enumerate(prepared):
            if isinstance(item, EventRejected):
                out[i] = item
            else:
                ready.append(item)
                index.append(i)
        t1 = time.perf_counter()
        if ready:
            feats = self.processor.run(ready)
            check_outputs(ready, feats, f"processor {self.config.processor!r}")
            for i, f in zip(index, feats, strict=True):
                out[i] = f
        # Read by the engine on its loop (deque appends and pops are thread-safe).
        self.timings.append((t1 - t0, time.perf_counter() - t1))
        return [o if o is not None else EventRejected("processor_error", "no outcome") for o in out]

    def _prepare(self, event: InputEvent) -> Any:
        try:
            return self.processor.prepare(event)
        except EventRejected as exc:
            return exc
        except Exception as exc:  # a decoder bug must not sink the batch
            return EventRejected("decode_error", f"{type(exc).__name__}: {exc}")


class Router:
    """First matching route wins; lookups are cached per subject (bounded)."""

    def __init__(self, routes: Sequence[Route], cache_size: int = 65_536) -> None:
        self.routes = list(routes)
        self._cache: OrderedDict[str, Route | None] = OrderedDict()
        self._cache_size = cache_size

    def route_for(self, event: InputEvent) -> Route:
        try:
            route = self._cache[event.subject]
        except KeyError:
            route = next((r for r in self.routes if r.matches(event)), None)
            self._cache[event.subject] = route
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if route is None:
            raise EventRejected("no_route", f"no route in routing.toml takes {event.subject!r}")
        return route
