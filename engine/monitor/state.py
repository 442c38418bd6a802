"""What the monitor page shows, sans-I/O: records and stats in, JSON-ready views out.

The NATS side (engine/monitor/feed.py) hands every result, rejection, sampled
frame and ``$SRV.STATS`` round to this state with the time it arrived; the
web side (engine/monitor/app.py) reads views of it. Nothing here touches a
socket or a clock, so the tests feed it records and times and read the
views back.

Rates come from the engines' own counters (``$SRV.STATS``), as differences
between two rounds divided by the time between them: the monitor may have
started long after the engines, and counters it did not see rise still
count. A counter that went down is an engine that restarted: its new value
is the rise. Latency percentiles come from the results seen
(``latency_ms.event_to_result``), the last :attr:`MonitorState.keep_latencies`.

Every change to a source's card takes the next sequence number, so the page
asks :meth:`MonitorState.changes_since` for the cards that moved since the
last push: 200 sources cost one push of the few that changed, not 200 cards
a second.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from engine.monitor.cards import SourceCard, window_row
from engine.monitor.rates import Rates, engine_rows, percentile, sum_engines

#: Frames the page can show as they are: the browser decodes them, the monitor never does.
SHOWN_TYPES = ("image/jpeg", "image/png")


@dataclass
class Frame:
    """A source's latest sampled input image, served at ``/frame/<source>``."""

    content_type: str
    data: bytes
    at: float
    version: int


@dataclass
class MonitorState:
    """Everything the page shows; fed by :mod:`engine.monitor.feed`."""

    #: Points per sparkline (one per stats round).
    history: int = 120
    #: Windows kept per source for its timeline.
    timeline: int = 30
    #: DLQ records kept for the rejections panel.
    keep_rejections: int = 20
    #: Results whose latency the percentiles read.
    keep_latencies: int = 1000
    #: Sources tracked; the least recently heard of goes first.
    max_sources: int = 10_000
    #: Seconds between two frames kept for one source (the rest are not copied).
    frame_every: float = 0.5
    #: A frame bigger than this is not kept (the page shows thumbnails).
    max_frame_bytes: int = 2 * 1024 * 1024
    #: All frames kept together; past it the source whose frame is oldest loses it.
    max_frames_total: int = 256 * 1024 * 1024

    seq: int = 0
    sources: OrderedDict[str, SourceCard] = field(default_factory=OrderedDict)
    frames: OrderedDict[str, Frame] = field(default_factory=OrderedDict)
    frame_bytes: int = 0
    rejections: deque[dict[str, Any]] = field(default_factory=deque)
    reasons_seen: Counter[str] = field(default_factory=Counter)
    latencies: deque[float] = field(default_factory=deque)
    rates: Rates = field(default_factory=Rates)
    engines: list[dict[str, Any]] = field(default_factory=list)
    results_seen: int = 0

    def __post_init__(self) -> None:
        self.rates.history = self.history

    # -- in -------------------------------------------------------------------------

    def on_result(self, record: dict[str, Any], now: float) -> None:
        """One result record (``<prefix>.out.<source>``), as JSON-decoded."""
        source = str(record.get("source") or "_")
        card = self._card(source, now)
        card.on_result(record, now)
        if len(card.windows) > self.timeline:
            card.windows.popleft()
        self.results_seen += 1
        took = (record.get("latency_ms") or {}).get("event_to_result")
        if isinstance(took, int | float):
            self.latencies.append(float(took))
            while len(self.latencies) > self.keep_latencies:
                self.latencies.popleft()

    def on_rejection(self, record: dict[str, Any], now: float) -> None:
        """One DLQ (or late) record: its reason counts, it joins the last few,
        and its source's card says what was refused."""
        reason = str(record.get("reason") or "?")
        self.reasons_seen[reason] += 1
        self.rejections.appendleft({**record, "at": now})
        while len(self.rejections) > self.keep_rejections:
            self.rejections.pop()
        source = record.get("source")
        if isinstance(source, str) and source:
            self._card(source, now).on_rejection(record, now)
        self.seq += 1  # the panel changed even when no card did

    def on_frame(self, source: str, content_type: str, data: bytes, now: float) -> bool:
        """An input image seen on NATS; kept when the browser can show it and
        the source's last one is older than :attr:`frame_every`. True if kept."""
        kind = content_type.split(";")[0].strip().lower()
        if kind not in SHOWN_TYPES or not data or len(data) > self.max_frame_bytes:
            return False
        last = self.frames.get(source)
        if last is not None and now - last.at < self.frame_every:
            return False
        version = last.version + 1 if last is not None else 1
        self._drop_frame(source)
        self.frames[source] = Frame(kind, data, now, version)
        self.frame_bytes += len(data)
        card = self._card(source, now)
        card.frame = version
        while self.frame_bytes > self.max_frames_total:
            oldest = next(iter(self.frames))
            self._drop_frame(oldest)
            self.seq += 1  # its card changes (no frame), but it was not heard of again
            self.sources[oldest].seq, self.sources[oldest].frame = self.seq, 0
        return True

    def on_stats(self, replies: list[dict[str, Any]], now: float) -> None:
        """One round of ``$SRV.STATS`` replies (every engine that answered)."""
        self.engines = engine_rows(replies, now)
        self.rates.on_round(replies, now)
        self.seq += 1

    # -- out ------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        totals = sum_engines(self.engines)
        return {
            "engines": self.engines,
            "rates": self.rates.view(),
            "latency_ms": {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "n": len(lat)},
            "routes": totals["routes"],
            "glm": totals["glm"],
            "totals": totals["counts"],
            "sources": len(self.sources),
            "results_seen": self.results_seen,
        }

    def rejections_view(self) -> dict[str, Any]:
        """Counts by reason (the engines' totals when they answer, else what
        this monitor saw on the DLQ) and the last few records."""
        by_engines: Counter[str] = Counter()
        for row in self.engines:
            for key, n in (row.get("rejected") or {}).items():
                by_engines[key.split(":", 1)[-1]] += n
        counts = by_engines | self.reasons_seen  # the larger of the two, per reason
        return {"counts": dict(counts.most_common()), "last": list(self.rejections)}

    def changes_since(self, seq: int) -> dict[str, Any]:
        """What the page needs after it last saw ``seq`` (0: everything)."""
        cards = [c.view() for c in self.sources.values() if c.seq > seq]
        return {
            "seq": self.seq,
            "full": seq == 0,
            "overview": self.overview(),
            "rejections": self.rejections_view(),
            "cards": cards,
        }

    def timeline_of(self, source: str) -> list[dict[str, Any]] | None:
        card = self.sources.get(source)
        return None if card is None else [window_row(w) for w in card.windows]

    # -- inside ---------------------------------------------------------------------

    def _card(self, source: str, now: float) -> SourceCard:
        self.seq += 1
        card = self.sources.get(source)
        if card is None:
            card = self.sources[source] = SourceCard(source)
            while len(self.sources) > self.max_sources:
                gone, _ = self.sources.popitem(last=False)
                self._drop_frame(gone)
        else:
            self.sources.move_to_end(source)
        card.seq, card.seen = self.seq, now
        return card

    def _drop_frame(self, source: str) -> None:
        gone = self.frames.pop(source, None)
        if gone is not None:
            self.frame_bytes -= len(gone.data)
