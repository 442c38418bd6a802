"""Event-time fusion per source: tumbling windows, watermarks, lateness, idle.

Every time here is integer nanoseconds. Event time is the producer's
timestamp; engine time comes from the injected clock (tests move it by hand).

Life of an event::

    admit()  -> reserves a slot in window floor(ts / w) * w   (or raises
                bad_timestamp / duplicate / too_late)
    complete() or discard()  -> the processor's outcome fills or frees it
    poll()   -> sealed windows whose slots are all filled come out as
                FusedFrame values, oldest first per source

Reserving at admission (before the slow processors run) is what makes the
result exact: a slow image batch cannot make its own events "late" because a
fast text event moved the watermark meanwhile.

A window is sealed when the source's watermark (highest event time seen minus
``allowed_lateness``) reaches its end, when the source has been quiet for
``idle_timeout`` of engine time, when the per-source cap on open windows
pushes it out, or at shutdown. An event whose window is already sealed is
``too_late``.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from engine.contracts.errors import EventRejected, LateEvent
from engine.contracts.types import (
    MODALITIES,
    Clock,
    Features,
    FusedFrame,
    InputEvent,
    Modality,
    ModalityFusion,
    Nanos,
    Vocabulary,
)
from engine.contracts.vocabulary import DEFAULT_VOCABULARY

if TYPE_CHECKING:
    from engine.config.models import AlignerConfig

_MS = 1_000_000
log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Slot:
    event_id: str
    modality: Modality
    ts: Nanos
    order: int
    features: Features | None = None
    process_ns: Nanos = 0
    arrived: Nanos = 0
    traceparent: str | None = None
    #: Engine-clock time its features arrived (for the event's trace span).
    done: Nanos = 0


@dataclass(slots=True)
class _Window:
    start: Nanos
    end: Nanos
    first_arrival: Nanos
    slots: dict[str, _Slot] = field(default_factory=dict)
    pending: int = 0
    sealed: bool = False
    traceparent: str | None = None
    #: why -> ids of events counted but not fused (rate-limited, stale).
    skipped: dict[str, list[str]] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Source:
    name: str
    #: Open and sealed-but-not-yet-emitted windows, by start.
    windows: dict[Nanos, _Window] = field(default_factory=dict)
    max_ts: Nanos | None = None
    #: Events before this event time are too late (a window boundary).
    sealed_until: Nanos | None = None
    last_seen: Nanos = 0
    #: Event id -> window start, for duplicates and for completing slots.
    ids: dict[str, Nanos] = field(default_factory=dict)
    counts: Counter[tuple[Modality, str]] = field(default_factory=Counter)


class _Counted(Protocol):
    counts: Counter[tuple[Modality, str]]


S = TypeVar("S", bound=_Counted)


class AlignerBase(Generic[S]):
    """What both modes share: the clock, the knobs, the counters, clock sanity."""

    def __init__(self, config: AlignerConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.lateness_ns = config.allowed_lateness_ms * _MS
        self.idle_ns = config.idle_timeout_ms * _MS
        self.future_ns = config.max_future_ms * _MS
        #: (modality, outcome) -> count over all sources.
        self.counts: Counter[tuple[Modality, str]] = Counter()
        self.sources_evicted = 0
        self.idle_closed = 0
        #: Tracked sources, least recently seen first.
        self._sources: OrderedDict[str, S] = OrderedDict()
        #: The idle clock: engine time less the time intake was held back.
        self._pauses = 0
        self._paused_at: Nanos = 0
        self._paused_total: Nanos = 0
        #: Skipped events not tied to a window (nearest mode): source -> why -> ids.
        self._loose: dict[str, dict[str, list[str]]] = {}

    def note(self, source: str, modality: Modality, outcome: str) -> None:
        """Count an outcome decided before the aligner."""
        self._count(self._sources.get(source), modality, outcome)

    def discard(self, source: str, event_id: str) -> None:
        raise NotImplementedError

    # -- the idle clock ---------------------------------------------------------

    def pause_idle(self) -> None:
        """Intake is held back (waiting for room, a store retrying): events that
        exist are not being read, so a quiet source is not idle. Nested calls nest."""
        if self._pauses == 0:
            self._paused_at = self.clock()
        self._pauses += 1

    def resume_idle(self) -> None:
        self._pauses -= 1
        if self._pauses == 0:
            self._paused_total += self.clock() - self._paused_at

    def _idle_now(self, now: Nanos) -> Nanos:
        """``now`` on the idle clock, which stands still while paused."""
        return (self._paused_at if self._pauses else now) - self._paused_total

    # -- skipped events -----------------------------------------------------------

    def skip(self, event: InputEvent, why: str, *, admitted: bool) -> None:
        """``event`` is counted as ``why`` and not fused; its id is listed in a
        result so the producer can tell. ``admitted``: it holds a slot (stale)."""
        if admitted:
            self.discard(event.source, event.event_id)
        self.note(event.source, event.modality, why)
        self._loose.setdefault(event.source, {}).setdefault(why, []).append(event.event_id)

    def _loose_frames(self, now: Nanos) -> list[FusedFrame]:
        """One result per source listing its loose skipped events."""
        out = [
            FusedFrame(
                source=source,
                start_ns=now,
                end_ns=now,
                modalities={},
                missing=tuple(self.config.expect),
                traceparent=None,
                first_arrival_ns=now,
                closed_ns=now,
                skipped={why: tuple(ids) for why, ids in groups.items()},
            )
            for source, groups in self._loose.items()
        ]
        self._loose = {}
        return out

    def source_names(self) -> list[str]:
        return list(self._sources)

    def pending_of(self, owns: Callable[[str], bool]) -> bool:
        """Some event of a source ``owns`` picks is still being processed."""
        raise NotImplementedError

    def close_sources(self, owns: Callable[[str], bool]) -> None:
        """Seal every window of the sources ``owns`` picks (their partition leaves)."""
        raise NotImplementedError

    def release(self, owns: Callable[[str], bool]) -> list[tuple[str, str]]:
        """Forget the sources ``owns`` picks (another worker takes them over):
        every event they hold that is not in an emitted frame comes back as
        ``(source, event id)``, unfused, for the caller to hand back. Call it
        once :meth:`pending_of` is false and :meth:`poll` emitted what was due."""
        keys = [
            (source, eid)
            for source, groups in self._loose.items()
            if owns(source)
            for ids in groups.values()
            for eid in ids
        ]
        self._loose = {s: g for s, g in self._loose.items() if not owns(s)}
        return keys

    def source_counts(self, source: str) -> Counter[tuple[Modality, str]]:
        src = self._sources.get(source)
        return Counter(src.counts) if src else Counter()

    def _count(self, src: S | None, modality: Modality, outcome: str, n: int = 1) -> None:
        self.counts[(modality, outcome)] += n
        if src is not None:
            src.counts[(modality, outcome)] += n

    def _check_clock(self, event: InputEvent, now: Nanos) -> None:
        """One producer with a clock far ahead must not close everyone's windows."""
        if event.ts_ns > now + self.future_ns:
            self._count(None, event.modality, "bad_timestamp")
            raise EventRejected(
                "bad_timestamp",
                f"timestamp {event.ts_ns} is {(event.ts_ns - now) / 1e6:.0f} ms ahead of the engine clock "
                f"(max_future_ms = {self.config.max_future_ms})",
            )


class Aligner(AlignerBase[_Source]):
    """Fuses one source's events per tumbling window of event time."""

    def __init__(self, config: AlignerConfig, clock: Clock) -> None:
        super().__init__(config, clock)
        self.window_ns = config.window_ms * _MS
        #: Sources holding unsealed windows, least recently seen first.
        self._active: OrderedDict[str, _Source] = OrderedDict()
        #: Sources that may have a window to emit now — a window was sealed with
        #: nothing pending, or a sealed window's last slot was filled — by
        #: ``id()`` (an evicted source and its successor of one name can both
        #: wait). Only these are visited by poll(): under a backlog, visiting
        #: every source with sealed windows on every event made intake quadratic.
        self._ready: dict[int, _Source] = {}
        #: Evicted sources whose sealed windows still wait for their slots.
        self._retired: list[_Source] = []
        self._order = 0

    # -- intake ---------------------------------------------------------------

    def admit(self, event: InputEvent) -> None:
        """Reserve a slot for ``event``; raise :class:`EventRejected` if it cannot join."""
        now = self.clock()
        ts = event.ts_ns
        self._check_clock(event, now)
        src = self._source(event.source, now)
        win = self._join(src, event, now)
        self._order += 1
        win.slots[event.event_id] = _Slot(
            event.event_id, event.modality, ts, self._order, arrived=now, traceparent=event.traceparent
        )
        win.pending += 1
        if win.traceparent is None:
            win.traceparent = event.traceparent
        src.ids[event.event_id] = win.start
        src.last_seen = self._idle_now(now)
        self._active[src.name] = src
        self._active.move_to_end(src.name)
        if src.max_ts is None or ts > src.max_ts:
            src.max_ts = ts
            watermark = ts - self.lateness_ns
            self._seal_before(src, watermark - watermark % self.window_ns)

    def _join(self, src: _Source, event: InputEvent, now: Nanos) -> _Window:
        """The window ``event`` belongs to; ``duplicate`` / ``too_late`` when it cannot join."""
        ts = event.ts_ns
        if not event.generated_id and event.event_id in src.ids:
            self._count(src, event.modality, "duplicate")
            raise EventRejected("duplicate", f"event id {event.event_id!r} is already in an open window")
        if src.sealed_until is not None and ts < src.sealed_until:
            self._count(src, event.modality, "too_late")
            raise LateEvent(
                f"event time {ts} falls in window "
                f"[{ts - ts % self.window_ns}, {ts - ts % self.window_ns + self.window_ns}) of source "
                f"{event.source!r}, which closed (watermark {src.sealed_until}, "
                f"allowed_lateness_ms = {self.config.allowed_lateness_ms})"
            )
        start = ts - ts % self.window_ns
        win = src.windows.get(start)
        if win is None:
            win = src.windows[start] = _Window(start, start + self.window_ns, now)
            self._cap_windows(src)
        return win

    def complete(self, source: str, event_id: str, features: Features, process_ns: Nanos = 0) -> None:
        """Fill an admitted event's slot with its features."""
        src, slot, win = self._slot(source, event_id)
        slot.features = features
        slot.process_ns = process_ns
        slot.done = self.clock()
        win.pending -= 1
        if win.sealed and not win.pending:
            self._ready[id(src)] = src

    def discard(self, source: str, event_id: str) -> None:
        """Free an admitted event's slot (the processor rejected it)."""
        src, _, win = self._slot(source, event_id)
        del win.slots[event_id]
        win.pending -= 1
        if win.sealed and not win.pending:
            self._ready[id(src)] = src

    def skip(self, event: InputEvent, why: str, *, admitted: bool) -> None:
        """List ``event`` as ``why`` in its window's result instead of fusing it.

        Not admitted (rate-limited): it is checked like an admitted event
        (``too_late``, ``duplicate`` raise) but does not move the watermark.
        """
        if admitted:
            src, _, win = self._slot(event.source, event.event_id)
            self.discard(event.source, event.event_id)
        else:
            now = self.clock()
            self._check_clock(event, now)
            src = self._source(event.source, now)
            win = self._join(src, event, now)
            src.ids[event.event_id] = win.start
            src.last_seen = self._idle_now(now)
            if not win.sealed:
                self._active[src.name] = src
                self._active.move_to_end(src.name)
        win.skipped.setdefault(why, []).append(event.event_id)
        self._count(src, event.modality, why)

    # -- output ---------------------------------------------------------------

    def poll(self) -> list[FusedFrame]:
        """Seal windows of idle sources, then emit every finished sealed window."""
        now = self.clock()
        idle_now = self._idle_now(now)
        while self._active:
            _name, src = next(iter(self._active.items()))
            if idle_now - src.last_seen < self.idle_ns:
                break
            self._seal_before(src, None)
            self.idle_closed += 1
        return self._emit(now)

    def flush(self) -> list[FusedFrame]:
        """Seal everything (shutdown) and emit what is finished."""
        for src in list(self._active.values()):
            self._seal_before(src, None)
        return self._emit(self.clock())

    @property
    def has_ready(self) -> bool:
        """Some sealed window waits to be emitted (poll soon)."""
        return bool(self._ready)

    def pending_of(self, owns: Callable[[str], bool]) -> bool:
        return any(
            w.pending
            for s in (*self._sources.values(), *self._retired)
            if owns(s.name)
            for w in s.windows.values()
        )

    def close_sources(self, owns: Callable[[str], bool]) -> None:
        for src in list(self._active.values()):
            if owns(src.name):
                self._seal_before(src, None)

    def release(self, owns: Callable[[str], bool]) -> list[tuple[str, str]]:
        keys = super().release(owns)
        for src in [*self._sources.values(), *self._retired]:
            if not owns(src.name):
                continue
            for win in src.windows.values():
                keys.extend((src.name, eid) for eid in win.slots)
                keys.extend((src.name, eid) for ids in win.skipped.values() for eid in ids)
            self._sources.pop(src.name, None)
            self._active.pop(src.name, None)
            self._ready.pop(id(src), None)
        self._retired = [r for r in self._retired if not owns(r.name)]
        return keys

    @property
    def open_windows(self) -> int:
        return sum(len(s.windows) for s in self._sources.values())

    @property
    def pending(self) -> int:
        return sum(w.pending for s in self._sources.values() for w in s.windows.values())

    # -- internals --------------------------------------------------------------

    def _source(self, name: str, now: Nanos) -> _Source:
        src = self._sources.get(name)
        if src is not None:
            self._sources.move_to_end(name)
            return src
        if len(self._sources) >= self.config.max_sources:
            self._evict_oldest()
        src = self._sources[name] = _Source(name, last_seen=self._idle_now(now))
        return src

    def _evict_oldest(self) -> None:
        _name, old = self._sources.popitem(last=False)
        self._seal_before(old, None)
        self.sources_evicted += 1
        for win in old.windows.values():
            for slot in win.slots.values():
                self._count(None, slot.modality, "evicted")
        # Its sealed windows still come out once their slots are filled.
        if old.windows:
            self._ready[id(old)] = old
            self._retired.append(old)

    def _cap_windows(self, src: _Source) -> None:
        if len(src.windows) <= self.config.max_open_windows:
            return  # the common case, checked per event: no sort
        open_starts = sorted(s for s, w in src.windows.items() if not w.sealed)
        while len(open_starts) > self.config.max_open_windows:
            oldest = src.windows[open_starts.pop(0)]
            for slot in oldest.slots.values():
                self._count(src, slot.modality, "evicted")
            self._seal_before(src, oldest.end)

    def _seal_before(self, src: _Source, boundary: Nanos | None) -> None:
        """Seal windows ending at or before ``boundary`` (all when ``None``)."""
        if boundary is not None and src.sealed_until is not None and boundary <= src.sealed_until:
            return  # the common case: the watermark moved inside an open window
        emittable = False
        for win in src.windows.values():
            if not win.sealed and (boundary is None or win.end <= boundary):
                win.sealed = True
                emittable = emittable or not win.pending
                if src.sealed_until is None or win.end > src.sealed_until:
                    src.sealed_until = win.end
        if boundary is not None and (src.sealed_until is None or boundary > src.sealed_until):
            src.sealed_until = boundary
        if emittable:
            self._ready[id(src)] = src
        if all(w.sealed for w in src.windows.values()):
            self._active.pop(src.name, None)

    def _slot(self, source: str, event_id: str) -> tuple[_Source, _Slot, _Window]:
        for src in (self._sources.get(source), *self._retired):
            if src is not None and src.name == source and event_id in src.ids:
                win = src.windows[src.ids[event_id]]
                return src, win.slots[event_id], win
        raise KeyError(f"event {event_id!r} of source {source!r} was never admitted")

    def _emit(self, now: Nanos) -> list[FusedFrame]:
        out: list[FusedFrame] = []
        ready, self._ready = self._ready, {}
        for src in ready.values():
            for start in sorted(src.windows):
                win = src.windows[start]
                if not win.sealed or win.pending:
                    break  # frames leave in time order: wait for the older one
                del src.windows[start]
                for eid in win.slots:
                    src.ids.pop(eid, None)
                for ids in win.skipped.values():
                    for eid in ids:
                        src.ids.pop(eid, None)
                frame = self._fuse_or_skip(src, win, now)
                if frame is not None:
                    out.append(frame)
            if not src.windows and self._retired:
                self._retired = [r for r in self._retired if r is not src]
        return out

    def _fuse_or_skip(self, src: _Source, win: _Window, now: Nanos) -> FusedFrame | None:
        """Fuse a window already taken out of its source; never lose it.

        The window and its ids are gone once it is taken out, so a failure here
        (features no vocabulary can fuse) must still end in a result: one that
        names every event of it under ``skipped.fuse_error``, so durable inputs
        are acked and the producer can tell, and later windows still come out.
        """
        try:
            return self._fuse(src, win, now)
        except Exception:
            log.exception("window %s of source %r could not be fused", win.start, src.name)
            failed = win.skipped.setdefault("fuse_error", [])
            for slot in win.slots.values():
                self._count(src, slot.modality, "fuse_error")
                failed.append(slot.event_id)
            win.slots = {}
            return self._fuse(src, win, now)

    def _fuse(self, src: _Source, win: _Window, now: Nanos) -> FusedFrame | None:
        if not win.slots and not win.skipped:
            return None  # every event of it was rejected by its processor
        by_mod: dict[Modality, list[_Slot]] = {}
        for slot in sorted(win.slots.values(), key=lambda s: (s.ts, s.order)):
            by_mod.setdefault(slot.modality, []).append(slot)
        missing = tuple(m for m in self.config.expect if m not in by_mod)
        lacking = [m for m in self.config.require if m not in by_mod]
        if lacking and self.config.on_missing == "drop":
            # Not fused, but named: the result lists them (and acks them, durable).
            dropped = win.skipped.setdefault("missing_dropped", [])
            for slots in by_mod.values():
                self._count(src, slots[0].modality, "missing_dropped", len(slots))
                dropped.extend(s.event_id for s in slots)
            by_mod = {}
        for mod, slots in by_mod.items():
            self._count(src, mod, "fused", len(slots))
        fused = {m: fuse_modality(by_mod[m], win.start) for m in MODALITIES if m in by_mod}
        return FusedFrame(
            source=src.name,
            start_ns=win.start,
            end_ns=win.end,
            modalities=fused,
            missing=missing,
            traceparent=win.traceparent if by_mod else None,
            first_arrival_ns=win.first_arrival,
            closed_ns=now,
            process_ns=max((s.process_ns for s in win.slots.values()), default=0),
            skipped={why: tuple(ids) for why, ids in win.skipped.items()},
        )


def fuse_modality(slots: Iterable[_Slot], start_ns: Nanos = 0) -> ModalityFusion:
    """Aggregate one modality's features in a window (slots in time order)
    that starts at ``start_ns``.

    What the summary holds is the features' vocabulary's business (their
    processor's); this adds ``count`` first and each event's ids and times.
    """
    items = [s for s in slots if s.features is not None]
    return _fuse_one(items[0], start_ns) if len(items) == 1 else _fuse_many(items, start_ns)


def _vocabulary(feats: list[Features]) -> Vocabulary:
    """The one vocabulary of a window's features; the default one when they
    disagree (a reload swapped the processor inside the window): no processor's
    vocabulary has to read another's features."""
    first = feats[0].vocabulary if feats else None
    for f in feats:  # attribute reads, no calls: this runs once per event
        v = f.vocabulary
        if v is not first and v != first:
            return DEFAULT_VOCABULARY  # (None, the default, disagreeing with it gives the same)
    return DEFAULT_VOCABULARY if first is None else first


def _fuse_many(items: list[_Slot], start_ns: Nanos = 0) -> ModalityFusion:
    feats = [s.features for s in items if s.features is not None]
    vocab = _vocabulary(feats)
    summary, embedding, attachment = vocab.fuse(feats)
    return ModalityFusion(
        event_ids=tuple(s.event_id for s in items),
        timestamps=tuple(s.ts for s in items),
        summary={"count": len(items), **summary},
        embedding=embedding,
        per_event=tuple(f.stats for f in feats),
        attachment=attachment,
        arrivals=tuple(s.arrived for s in items),
        done=tuple(s.done for s in items),
        traceparents=tuple(s.traceparent for s in items),
        vocabulary=vocab,
        model=feats[-1].model,
        start_ns=start_ns,
    )


def _fuse_one(slot: _Slot, start_ns: Nanos = 0) -> ModalityFusion:
    """:func:`fuse_modality` of a single event, without the list work: with
    short windows and many sources most windows hold one event per modality
    (benchmarks/RESULTS.md, bus). Same output as the general path."""
    f = slot.features
    assert f is not None
    vocab = DEFAULT_VOCABULARY if f.vocabulary is None else f.vocabulary
    summary, embedding, attachment = vocab.fuse((f,))
    return ModalityFusion(
        event_ids=(slot.event_id,),
        timestamps=(slot.ts,),
        summary={"count": 1, **summary},
        embedding=embedding,
        per_event=(f.stats,),
        attachment=attachment,
        arrivals=(slot.arrived,),
        done=(slot.done,),
        traceparents=(slot.traceparent,),
        vocabulary=vocab,
        model=f.model,
        start_ns=start_ns,
    )
