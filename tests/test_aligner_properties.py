"""Property test: the aligner against a plain reference (sort by time, then group)."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.contracts.errors import EventRejected
from tests.test_aligner import MS, T0, Clock, ev, feat, make

WINDOW_MS = 100
LATENESS_MS = 30


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[tuple[str, str, int, str]], list[int]]:
    """Events in arrival order: (source, modality, ts, id), with disorder up to
    twice the allowed lateness (so some are too late), repeated ids, and a
    random order in which the processors finish."""
    n = draw(st.integers(1, 60))
    events = []
    for i in range(n):
        source = draw(st.sampled_from(["a", "b", "c"]))
        modality = draw(st.sampled_from(["image", "audio", "text"]))
        nominal = i * draw(st.integers(0, 25))
        jitter = draw(st.integers(-2 * LATENESS_MS, 2 * LATENESS_MS))
        ts = T0 + max(0, nominal + jitter) * MS + draw(st.integers(0, 3))  # equal ts happen too
        eid = f"{source}-e{draw(st.integers(0, n))}" if draw(st.booleans()) else f"u{i}"
        events.append((source, modality, ts, eid))
    completion = draw(st.permutations(range(n)))
    return events, list(completion)


def reference(accepted: list[tuple[str, str, int, str, int]]) -> dict[tuple[str, int], dict[str, list[str]]]:
    """Group accepted events by (source, window start); ids by (ts, arrival)."""
    frames: dict[tuple[str, int], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for source, modality, ts, eid, _ in sorted(accepted, key=lambda e: (e[2], e[4])):
        start = ts - ts % (WINDOW_MS * MS)
        frames[(source, start)][modality].append(eid)
    return {k: dict(v) for k, v in frames.items()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_every_event_is_fused_once_or_counted_once(
    stream: tuple[list[tuple[str, str, int, str]], list[int]],
) -> None:
    events, completion = stream
    clock = Clock(T0 + 10**12)  # engine time well past every event: nothing is "future"
    a = make(clock, window_ms=WINDOW_MS, allowed_lateness_ms=LATENESS_MS, idle_timeout_ms=10**9)
    accepted: list[tuple[str, str, int, str, int]] = []
    rejected: dict[int, str] = {}
    # Admit everything first (processors are slow), then finish in random order.
    for i, (source, modality, ts, eid) in enumerate(events):
        try:
            a.admit(ev(source, modality, ts, eid))
            accepted.append((source, modality, ts, eid, i))
        except EventRejected as exc:
            rejected[i] = exc.reason
    frames = []
    by_index = {e[4]: e for e in accepted}
    for i in completion:
        if i in by_index:
            source, modality, _, eid, _ = by_index[i]
            a.complete(source, eid, feat(modality))
            frames += a.poll()
    frames += a.flush()

    # Every event: fused exactly once, or rejected under exactly one reason.
    fused = [eid for f in frames for m in f.modalities.values() for eid in m.event_ids]
    assert len(fused) == len(set(fused)) == len(accepted)
    assert len(accepted) + len(rejected) == len(events)
    assert set(rejected.values()) <= {"too_late", "duplicate"}
    # The reasons are the documented rules, replayed in arrival order.
    max_ts: dict[str, int] = {}
    open_ids: dict[str, set[str]] = defaultdict(set)
    for i, (source, _, ts, eid) in enumerate(events):
        if i in rejected:
            if rejected[i] == "duplicate":
                assert eid in {e[3] for e in accepted if e[0] == source}
            else:
                wm = max_ts[source] - LATENESS_MS * MS
                assert ts < wm - wm % (WINDOW_MS * MS)
            continue
        max_ts[source] = max(max_ts.get(source, ts), ts)
        open_ids[source].add(eid)
    # Frames come out per source in time order, and match the reference.
    for source in "abc":
        starts = [f.start_ns for f in frames if f.source == source]
        assert starts == sorted(starts) and len(starts) == len(set(starts))
    got = {(f.source, f.start_ns): {m: list(x.event_ids) for m, x in f.modalities.items()} for f in frames}
    assert got == reference(accepted)
    # Counters agree with what happened.
    assert sum(n for (_, outcome), n in a.counts.items() if outcome == "fused") == len(accepted)
    assert sum(n for (_, outcome), n in a.counts.items() if outcome == "too_late") == sum(
        r == "too_late" for r in rejected.values()
    )
    assert a.open_windows == 0 and a.pending == 0
