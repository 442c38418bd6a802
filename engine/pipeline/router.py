"""Routes: which processor (and batcher) an event goes to, and its rate control."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.contracts.errors import EventRejected, ProcessorError
from engine.contracts.types import Features, InputEvent, ModelVersion, Nanos, Processor
from engine.pipeline.batcher import Batcher, check_outputs
from engine.pipeline.variants import Assignment, Variant, cosine_distance

if TYPE_CHECKING:
    from engine.config.models import RouteConfig

Outcome = Features | EventRejected

log = logging.getLogger(__name__)

#: Shadow batches queued or running per route; past it a shadow batch is
#: dropped (and counted), so a slow shadow never builds up a backlog.
SHADOW_QUEUE = 8


def _plugin_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a plugin's failure to be contained, not the process
    being stopped (Ctrl-C, ``sys.exit``) or the interpreter (``GeneratorExit``)."""
    return not isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit)


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
    """A live route: its config, processor instance, batcher and rate limiter.

    ``variants`` are its loaded A/B arms (:mod:`engine.pipeline.variants`);
    without any, ``processor`` is its one variant, named ``""``.
    """

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
    variants: list[Variant] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.variants:
            name = self.config.processor
            self.variants = [Variant("", 1.0, self.processor, ModelVersion(name, name, ""))]
        live = [v for v in self.variants if not v.shadow and v.weight > 0]
        self.processor = live[0].processor
        self.shadows = [v for v in self.variants if v.shadow]
        self.assignment = Assignment(self.config.experiment, live) if len(live) > 1 else None
        self._only = live[0]
        max_fps = getattr(self.processor, "max_fps", None)
        if self.limiter is None and isinstance(max_fps, int | float) and max_fps > 0:
            self.limiter = RateLimiter(float(max_fps))
        if self.prepare_pool is None and self.config.prepare_threads > 1:
            self.prepare_pool = ThreadPoolExecutor(
                self.config.prepare_threads, thread_name_prefix=f"autoglm-prepare-{self.name}"
            )
        #: Shadows run here, after the live outcomes are handed back: a slow or
        #: hanging shadow costs the live events nothing (one thread per route,
        #: at most ``SHADOW_QUEUE`` batches waiting, the rest dropped).
        self._shadow_pool: ThreadPoolExecutor | None = None
        self._shadow_lock = threading.Lock()
        self._shadow_queued = 0
        self._shadows_idle = threading.Event()
        self._shadows_idle.set()
        #: Shadow batches dropped because the queue was full.
        self.shadow_dropped = 0

    def close(self) -> None:
        if self.prepare_pool is not None:
            self.prepare_pool.shutdown(wait=True)
        if self._shadow_pool is not None:  # a hung shadow must not hold up a reload or a stop
            self._shadow_pool.shutdown(wait=False, cancel_futures=True)

    def shadows_done(self, timeout: float | None = None) -> bool:
        """Wait until no shadow batch is queued or running; whether none is."""
        return self._shadows_idle.wait(timeout)

    def matches(self, event: InputEvent) -> bool:
        if event.modality != self.config.modality:
            return False
        return self.config.subject is None or subject_matches(self.config.subject, event.subject)

    def variant_of(self, source: str) -> Variant:
        """The live variant ``source`` is assigned to."""
        return self._only if self.assignment is None else self.assignment.of(source)

    def process(self, events: Sequence[InputEvent]) -> list[Outcome]:
        """Prepare each event, run the valid ones as one batch (worker thread).

        A bad event becomes its own :class:`EventRejected`; the rest of the
        batch still runs. If ``run`` itself fails the exception propagates
        and the caller rejects the whole batch with ``processor_error``.
        With variants the batch runs as one sub-batch per variant, and a
        variant that fails rejects only its own events: the other variant's
        are not its business. Shadows then run on all of it, on their own
        thread once this has returned (:meth:`_shadow`).
        """
        if self.assignment is None:
            out = self._run(self._only, events)
        else:
            groups: dict[int, tuple[Variant, list[int]]] = {}
            for i, ev in enumerate(events):
                v = self.assignment.of(ev.source)
                groups.setdefault(id(v), (v, []))[1].append(i)
            out = [None] * len(events)  # type: ignore[list-item]
            for v, index in groups.values():
                for i, o in zip(index, self._run_variant(v, [events[i] for i in index]), strict=True):
                    out[i] = o
        if self.shadows:
            self._queue_shadows(events, out)
        return out

    def _run_variant(self, variant: Variant, events: Sequence[InputEvent]) -> list[Outcome]:
        """One variant's sub-batch; its failure rejects its events only."""
        try:
            return self._run(variant, events)
        except BaseException as exc:
            if not _plugin_failure(exc):
                raise
            log.error(
                "variant %r of route %s failed on %d events: %s",
                variant.name, self.name, len(events), exc, exc_info=exc,
            )  # fmt: skip
            why = f"variant {variant.name!r}: {type(exc).__name__}: {exc}"
            return [EventRejected("processor_error", why) for _ in events]

    def _queue_shadows(self, events: Sequence[InputEvent], live: Sequence[Outcome]) -> None:
        with self._shadow_lock:
            if self._shadow_queued >= SHADOW_QUEUE:
                self.shadow_dropped += 1
                for shadow in self.shadows:  # not run: counted as errors, never compared
                    shadow.count(0, len(events), 0.0)
                return
            self._shadow_queued += 1
            self._shadows_idle.clear()
            if self._shadow_pool is None:
                self._shadow_pool = ThreadPoolExecutor(1, thread_name_prefix=f"autoglm-shadow-{self.name}")
        try:
            self._shadow_pool.submit(self._run_shadows, list(events), list(live))
        except RuntimeError:  # closed meanwhile (the route was retired): nothing to compare with
            self._shadow_finished()

    def _run_shadows(self, events: Sequence[InputEvent], live: Sequence[Outcome]) -> None:
        try:
            for shadow in self.shadows:
                self._shadow(shadow, events, live)
        finally:
            self._shadow_finished()

    def _shadow_finished(self) -> None:
        with self._shadow_lock:
            self._shadow_queued -= 1
            if self._shadow_queued == 0:
                self._shadows_idle.set()

    def _run(self, variant: Variant, events: Sequence[InputEvent]) -> list[Outcome]:
        processor = variant.processor
        out: list[Outcome | None] = [None] * len(events)
        ready: list[Any] = []
        index: list[int] = []
        t0 = time.perf_counter()
        if self.prepare_pool is not None and len(events) > 1:
            prepared = list(self.prepare_pool.map(lambda ev: self._prepare(processor, ev), events))
        else:
            prepared = [self._prepare(processor, ev) for ev in events]
        for i, item in enumerate(prepared):
            if isinstance(item, EventRejected):
                out[i] = item
            else:
                ready.append(item)
                index.append(i)
        t1 = time.perf_counter()
        if ready:
            try:
                feats = processor.run(ready)
                check_outputs(ready, feats, f"processor {variant.model.processor!r}")
            except BaseException as exc:
                variant.count(0, len(events), time.perf_counter() - t0)
                if isinstance(exc, Exception) or not _plugin_failure(exc):
                    raise
                # A plugin's own BaseException would slip past every ``except
                # Exception`` up to the driver and strand the batch's events.
                raise ProcessorError(f"{type(exc).__name__}: {exc}") from exc
            model = variant.model
            for i, f in zip(index, feats, strict=True):
                # The features were just made here and nobody else holds them yet:
                # naming their model in place costs no copy of every field.
                object.__setattr__(f, "model", model)
                out[i] = f
        t2 = time.perf_counter()
        variant.count(len(ready), len(events) - len(ready), t2 - t0)
        # Read by the engine on its loop (deque appends and pops are thread-safe).
        self.timings.append((t1 - t0, t2 - t1))
        return [o if o is not None else EventRejected("processor_error", "no outcome") for o in out]

    def _shadow(self, shadow: Variant, events: Sequence[InputEvent], live: Sequence[Outcome]) -> None:
        """Run a shadow variant on the events the live ones took, compare, drop.
        Its failure is counted and costs the live events nothing."""
        t0 = time.perf_counter()
        try:
            pairs = [(self._prepare(shadow.processor, ev), o) for ev, o in zip(events, live, strict=True)]
            pairs = [(p, o) for p, o in pairs if not isinstance(p, EventRejected)]
            feats = shadow.processor.run([p for p, _ in pairs]) if pairs else []
            check_outputs(pairs, feats, f"shadow {shadow.name!r}")
        except BaseException as exc:  # a plugin's own BaseException too: the shadow's, not ours
            if not _plugin_failure(exc):
                raise
            shadow.count(0, len(events), time.perf_counter() - t0)
            return
        compared, distance = 0, 0.0
        for f, (_, o) in zip(feats, pairs, strict=True):
            if isinstance(o, Features) and (d := cosine_distance(f, o)) is not None:
                compared += 1
                distance += d
        shadow.count(len(feats), len(events) - len(feats), time.perf_counter() - t0, compared, distance)

    @staticmethod
    def _prepare(processor: Processor[Any], event: InputEvent) -> Any:
        try:
            return processor.prepare(event)
        except EventRejected as exc:
            return exc
        except BaseException as exc:  # a decoder bug (or a plugin's BaseException) must not sink the batch
            if not _plugin_failure(exc):
                raise
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
