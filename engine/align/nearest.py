"""``mode = "nearest"``: one fused frame per pivot event (say, each camera frame).

Each other modality contributes its event nearest in event time to the pivot,
within ``slop_ms`` — like ROS 2's ApproximateTimeSynchronizer, but
deterministic (ties go to the earlier timestamp, then the earlier arrival),
tolerant of equal timestamps, and counting every event it leaves unmatched.

Pivots are decided in (timestamp, arrival) order, each once the source's
watermark (highest event time − ``allowed_lateness``) has passed
``pivot + slop`` and every event up to there has been processed; a candidate
goes to at most one pivot. After pivot ``P`` is decided, a pivot older than
``P`` or a candidate within ``slop`` of ``P`` (or older) is ``too_late``;
candidates that no future pivot can reach are counted as ``unmatched``.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.align.aligner import AlignerBase, _Slot, fuse_modality
from engine.contracts.errors import EventRejected, LateEvent
from engine.contracts.types import MODALITIES, Clock, Features, FusedFrame, InputEvent, Modality, Nanos

if TYPE_CHECKING:
    from engine.config.models import AlignerConfig

_MS = 1_000_000


def _key(s: _Slot) -> tuple[int, int]:
    return (s.ts, s.order)


@dataclass(slots=True, eq=False)
class _NSource:
    name: str
    last_seen: Nanos
    max_ts: Nanos | None = None
    #: Pivots older than this are too late; candidates below ``cand_floor`` too.
    pivot_floor: Nanos | None = None
    cand_floor: Nanos | None = None
    pivots: list[_Slot] = field(default_factory=list)
    cands: dict[Modality, list[_Slot]] = field(default_factory=dict)
    slots: dict[str, _Slot] = field(default_factory=dict)
    counts: Counter[tuple[Modality, str]] = field(default_factory=Counter)


class NearestAligner(AlignerBase[_NSource]):
    """Pivot-driven nearest-in-time fusion per source (see module docstring)."""

    def __init__(self, config: AlignerConfig, clock: Clock) -> None:
        super().__init__(config, clock)
        self.pivot: Modality = config.pivot
        self.slop_ns = config.slop_ms * _MS
        self._retired: list[_NSource] = []
        self._dirty: dict[int, _NSource] = {}
        self._out: list[FusedFrame] = []
        self._order = 0

    # -- the interface the engine uses (same as Aligner) --------------------------

    def admit(self, event: InputEvent) -> None:
        now = self.clock()
        ts, mod = event.ts_ns, event.modality
        self._check_clock(event, now)
        src = self._source(event.source, now)
        if not event.generated_id and event.event_id in src.slots:
            self._count(src, mod, "duplicate")
            raise EventRejected("duplicate", f"event id {event.event_id!r} is already waiting for a match")
        floor = src.pivot_floor if mod == self.pivot else src.cand_floor
        if floor is not None and ts < floor:
            self._count(src, mod, "too_late")
            what = "pivots" if mod == self.pivot else f"{mod} events"
            raise LateEvent(
                f"event time {ts} of source {event.source!r}: {what} before {floor} can no longer "
                f"be matched (pivot {self.pivot}, slop_ms = {self.config.slop_ms})"
            )
        self._order += 1
        slot = _Slot(event.event_id, mod, ts, self._order, arrived=now, traceparent=event.traceparent)
        bisect.insort(src.pivots if mod == self.pivot else src.cands.setdefault(mod, []), slot, key=_key)
        src.slots[event.event_id] = slot
        src.last_seen = self._idle_now(now)
        if src.max_ts is None or ts > src.max_ts:
            src.max_ts = ts
        # Seal here, not in poll(): what is too late must not depend on when
        # the engine happens to poll. Pivots whose slop the watermark passed
        # are final; the choice among their partners waits for processing.
        horizon = src.max_ts - self.lateness_ns - self.slop_ns
        sealed = bisect.bisect_right(src.pivots, horizon, key=lambda s: s.ts)
        if sealed:
            last = src.pivots[sealed - 1].ts
            self._raise_floors(src, last, last + self.slop_ns + 1)
        self._dirty[id(src)] = src
        if len(src.pivots) > self.config.max_open_windows:
            oldest = src.pivots[0]
            self._count(src, oldest.modality, "evicted")
            self._decide(src, force_until=oldest.ts)

    def complete(self, source: str, event_id: str, features: Features, process_ns: Nanos = 0) -> None:
        src, slot = self._find(source, event_id)
        slot.features = features
        slot.process_ns = process_ns
        slot.done = self.clock()
        self._dirty[id(src)] = src

    def discard(self, source: str, event_id: str) -> None:
        src, slot = self._find(source, event_id)
        del src.slots[event_id]
        lst = src.pivots if slot.modality == self.pivot else src.cands[slot.modality]
        lst.remove(slot)
        self._dirty[id(src)] = src

    def poll(self) -> list[FusedFrame]:
        now = self.clock()
        idle_now = self._idle_now(now)
        for src in list(self._sources.values()):
            if idle_now - src.last_seen < self.idle_ns:
                break  # least recently seen first: the rest are younger
            if src.slots:
                self.idle_closed += 1
                self._close(src)
        for src in list(self._dirty.values()):
            self._decide(src)
        self._dirty.clear()
        out, self._out = self._out, []
        return out + self._loose_frames(now)

    def flush(self) -> list[FusedFrame]:
        for src in [*self._sources.values(), *self._retired]:
            self._close(src)
        self._retired = [r for r in self._retired if r.slots]
        out, self._out = self._out, []
        return out + self._loose_frames(self.clock())

    @property
    def has_ready(self) -> bool:
        return bool(self._dirty) or bool(self._out) or bool(self._loose)

    def pending_of(self, owns: Callable[[str], bool]) -> bool:
        return any(
            x.features is None
            for s in (*self._sources.values(), *self._retired)
            if owns(s.name)
            for x in s.slots.values()
        )

    def close_sources(self, owns: Callable[[str], bool]) -> None:
        for src in list(self._sources.values()):
            if owns(src.name) and src.slots:
                self._close(src)

    def release(self, owns: Callable[[str], bool]) -> list[tuple[str, str]]:
        keys = super().release(owns)
        for src in [*self._sources.values(), *self._retired]:
            if owns(src.name):
                keys.extend((src.name, eid) for eid in src.slots)
                self._sources.pop(src.name, None)
                self._dirty.pop(id(src), None)
        self._retired = [r for r in self._retired if not owns(r.name)]
        return keys

    @property
    def open_windows(self) -> int:
        return sum(len(s.pivots) for s in self._sources.values())

    @property
    def pending(self) -> int:
        return sum(1 for s in self._sources.values() for x in s.slots.values() if x.features is None)

    # -- internals --------------------------------------------------------------------

    def _source(self, name: str, now: Nanos) -> _NSource:
        src = self._sources.get(name)
        if src is not None:
            self._sources.move_to_end(name)
            return src
        if len(self._sources) >= self.config.max_sources:
            _, old = self._sources.popitem(last=False)
            self.sources_evicted += 1
            for slot in old.slots.values():
                self._count(None, slot.modality, "evicted")
            self._close(old)
            if old.slots:  # still processing: finish later
                self._retired.append(old)
        src = self._sources[name] = _NSource(name, last_seen=self._idle_now(now))
        return src

    def _find(self, source: str, event_id: str) -> tuple[_NSource, _Slot]:
        for src in (self._sources.get(source), *self._retired):
            if src is not None and src.name == source and event_id in src.slots:
                return src, src.slots[event_id]
        raise KeyError(f"event {event_id!r} of source {source!r} was never admitted")

    def _close(self, src: _NSource) -> None:
        """Idle, evicted or shutting down: decide every pivot, drop what is left."""
        self._decide(src, force_until=None, everything=True)
        if src.pivots:
            return  # some slots are still processing; the next poll retries
        top = None
        for mod, lst in src.cands.items():
            done = [c for c in lst if c.features is not None]
            for c in done:
                self._unmatched(src, c)
                top = c.ts if top is None else max(top, c.ts)
            src.cands[mod] = [c for c in lst if c.features is None]
        if top is not None:  # a pivot that could have taken them would now be too late
            self._raise_floors(src, top + self.slop_ns + 1, top + 1)

    def _unmatched(self, src: _NSource, slot: _Slot) -> None:
        """No pivot can take it: counted, and named in a result of its source."""
        del src.slots[slot.event_id]
        self._count(src, slot.modality, "unmatched")
        self._loose.setdefault(src.name, {}).setdefault("unmatched", []).append(slot.event_id)

    def _raise_floors(self, src: _NSource, pivot_floor: Nanos, cand_floor: Nanos) -> None:
        src.pivot_floor = pivot_floor if src.pivot_floor is None else max(src.pivot_floor, pivot_floor)
        src.cand_floor = cand_floor if src.cand_floor is None else max(src.cand_floor, cand_floor)

    def _decide(self, src: _NSource, force_until: Nanos | None = None, everything: bool = False) -> None:
        watermark = None if src.max_ts is None else src.max_ts - self.lateness_ns
        while src.pivots:
            p = src.pivots[0]
            limit = p.ts + self.slop_ns
            forced = everything or (force_until is not None and p.ts <= force_until)
            if not forced and (watermark is None or limit > watermark):
                return
            # Everything that could be matched must have been processed.
            if p.features is None or any(
                c.features is None
                for lst in src.cands.values()
                for c in lst[: bisect.bisect_right(lst, limit, key=lambda s: s.ts)]
            ):
                return
            src.pivots.pop(0)
            del src.slots[p.event_id]
            chosen: dict[Modality, _Slot] = {p.modality: p}
            for mod, lst in src.cands.items():
                lo = bisect.bisect_left(lst, p.ts - self.slop_ns, key=lambda s: s.ts)
                hi = bisect.bisect_right(lst, limit, key=lambda s: s.ts)
                if lo < hi:
                    best = min(lst[lo:hi], key=lambda c: (abs(c.ts - p.ts), c.ts, c.order))
                    lst.remove(best)
                    del src.slots[best.event_id]
                    chosen[mod] = best
                # No later pivot (ts >= p.ts) can reach candidates below p.ts - slop.
                while lst and lst[0].ts < p.ts - self.slop_ns and lst[0].features is not None:
                    self._unmatched(src, lst.pop(0))
            self._raise_floors(src, p.ts, limit + 1)
            self._emit(src, p, chosen)

    def _emit(self, src: _NSource, p: _Slot, chosen: dict[Modality, _Slot]) -> None:
        missing = tuple(m for m in self.config.expect if m not in chosen)
        if [m for m in self.config.require if m not in chosen] and self.config.on_missing == "drop":
            for mod, slot in chosen.items():
                self._count(src, mod, "missing_dropped")
                self._loose.setdefault(src.name, {}).setdefault("missing_dropped", []).append(slot.event_id)
            return
        for mod in chosen:
            self._count(src, mod, "fused")
        self._out.append(
            FusedFrame(
                source=src.name,
                start_ns=p.ts - self.slop_ns,
                end_ns=p.ts + self.slop_ns,
                modalities={
                    m: fuse_modality([chosen[m]], p.ts - self.slop_ns) for m in MODALITIES if m in chosen
                },
                missing=missing,
                traceparent=p.traceparent,
                first_arrival_ns=min(s.arrived for s in chosen.values()),
                closed_ns=self.clock(),
                process_ns=max(s.process_ns for s in chosen.values()),
                key=f"{src.name}:{p.ts}:{p.event_id}",
            )
        )
