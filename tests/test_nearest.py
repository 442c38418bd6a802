"""``mode = "nearest"``: one frame per pivot, nearest partner per modality within slop."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.align.nearest import NearestAligner
from engine.config.models import AlignerConfig
from engine.contracts.errors import EventRejected
from engine.contracts.types import FusedFrame
from tests.test_aligner import MS, T0, Clock, ev, feat


def make(clock: Clock, **cfg: Any) -> NearestAligner:
    base: dict[str, Any] = {"mode": "nearest", "pivot": "image", "slop_ms": 20, "idle_timeout_ms": 1000}
    return NearestAligner(AlignerConfig(**{**base, **cfg}), clock)


def push(a: NearestAligner, mod: str, off_ms: float, eid: str, source: str = "s") -> None:
    e = ev(source, mod, T0 + int(off_ms * MS), eid)
    a.admit(e)
    a.complete(source, eid, feat(mod))


def ids(frame: FusedFrame) -> dict[str, list[str]]:
    return {m: list(f.event_ids) for m, f in frame.modalities.items()}


def fused(frames: list[FusedFrame]) -> list[FusedFrame]:
    """The frames that fuse events (not those that only name skipped ones)."""
    return [f for f in frames if f.modalities]


def skipped(frames: list[FusedFrame]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in frames:
        for why, group in f.skipped.items():
            out.setdefault(why, []).extend(group)
    return out


def test_each_pivot_takes_the_nearest_partner_within_slop() -> None:
    a = make(Clock())
    for mod, off, eid in [
        ("image", 0, "p0"), ("audio", 5, "a5"), ("text", 30, "t30"), ("image", 33, "p33"),
        ("audio", 40, "a40"), ("image", 66, "p66"), ("audio", 100, "a100"), ("image", 200, "p200"),
    ]:  # fmt: skip
        push(a, mod, off, eid)
    polled = a.poll()  # watermark 200 ms: p0, p33, p66 decided
    frames = fused(polled)
    assert [ids(f) for f in frames] == [
        {"image": ["p0"], "audio": ["a5"]},
        {"image": ["p33"], "audio": ["a40"], "text": ["t30"]},
        {"image": ["p66"]},
    ]
    assert frames[2].missing == ("audio", "text")
    assert frames[1].start_ns == T0 + 13 * MS and frames[1].end_ns == T0 + 53 * MS
    assert len({f.key for f in frames}) == 3
    rest = a.flush()
    [last] = fused(rest)
    assert ids(last) == {"image": ["p200"]}
    assert a.counts[("audio", "unmatched")] == 1  # a100: no pivot within 20 ms
    assert skipped(polled + rest) == {"unmatched": ["a100"]}  # named in a result, not only counted


def test_ties_go_to_the_earlier_timestamp_then_the_earlier_arrival() -> None:
    a = make(Clock())
    push(a, "image", 50, "p")
    push(a, "audio", 60, "later")
    push(a, "audio", 40, "earlier")  # same distance, earlier timestamp wins
    push(a, "text", 55, "first")
    push(a, "text", 55, "second")  # same timestamp, earlier arrival wins
    out = a.flush()
    [frame] = fused(out)
    assert ids(frame) == {"image": ["p"], "audio": ["earlier"], "text": ["first"]}
    assert sorted(skipped(out)["unmatched"]) == ["later", "second"]
    assert a.counts[("audio", "unmatched")] == 1 and a.counts[("text", "unmatched")] == 1


def test_equal_pivot_timestamps_and_a_partner_used_once() -> None:
    a = make(Clock())
    push(a, "image", 10, "p1")
    push(a, "image", 10, "p2")
    push(a, "audio", 12, "a")
    frames = a.flush()
    assert [ids(f) for f in frames] == [{"image": ["p1"], "audio": ["a"]}, {"image": ["p2"]}]
    assert frames[0].key != frames[1].key


def test_late_pivots_and_partners_are_refused() -> None:
    a = make(Clock())
    push(a, "image", 33, "p33")
    push(a, "image", 100, "p100")  # watermark 100: p33 decided
    assert len(a.poll()) == 1
    with pytest.raises(EventRejected, match="too_late"):
        a.admit(ev("s", "image", T0 + 30 * MS, "p30"))
    with pytest.raises(EventRejected, match="too_late"):
        a.admit(ev("s", "audio", T0 + 53 * MS, "a53"))  # within slop of the decided p33
    push(a, "image", 33, "p33b")  # equal to the decided pivot: accepted
    push(a, "audio", 54, "a54")  # out of p33's reach: accepted
    assert a.counts[("image", "too_late")] == 1 and a.counts[("audio", "too_late")] == 1


def test_a_partner_still_processing_holds_the_decision() -> None:
    a = make(Clock())
    push(a, "image", 0, "p0")
    a.admit(ev("s", "audio", T0 + 3 * MS, "slow"))
    push(a, "image", 500, "p500")
    assert a.poll() == []
    a.complete("s", "slow", feat("audio"))
    [frame] = a.poll()
    assert ids(frame) == {"image": ["p0"], "audio": ["slow"]}


def test_idle_source_is_decided_and_its_leftovers_counted() -> None:
    clock = Clock()
    a = make(clock, idle_timeout_ms=100)
    push(a, "image", 0, "p0")
    push(a, "text", 500, "lonely")
    clock.now += 100 * MS
    out = a.poll()
    [frame] = fused(out)
    assert ids(frame) == {"image": ["p0"]}
    assert skipped(out) == {"unmatched": ["lonely"]}
    assert a.counts[("text", "unmatched")] == 1
    assert a.open_windows == 0 and a.pending == 0


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[str, int, str]]:
    n = draw(st.integers(1, 50))
    out = []
    for i in range(n):
        mod = draw(st.sampled_from(["image", "image", "audio", "text"]))
        ts = T0 + max(0, i * draw(st.integers(0, 15)) + draw(st.integers(-40, 40))) * MS
        out.append((mod, ts, f"{mod}{i}"))
    return out


def reference(accepted: list[tuple[str, int, str, int]], slop: int) -> list[dict[str, list[str]]]:
    """Offline: pivots by (ts, arrival); each takes its nearest unused partner."""
    pivots = sorted((e for e in accepted if e[0] == "image"), key=lambda e: (e[1], e[3]))
    free = [e for e in accepted if e[0] != "image"]
    frames = []
    for _, ts, eid, _ in pivots:
        frame = {"image": [eid]}
        for m in ("audio", "text"):
            near = [c for c in free if c[0] == m and abs(c[1] - ts) <= slop]
            if near:
                best = min(near, key=lambda c: (abs(c[1] - ts), c[1], c[3]))
                free.remove(best)
                frame[m] = [best[2]]
        frames.append(frame)
    return frames


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.integers(0, 30), st.lists(st.booleans(), min_size=50, max_size=50))
def test_matches_the_offline_reference(
    stream: list[tuple[str, int, str]], lateness: int, polls: list[bool]
) -> None:
    """Also whatever the engine's poll timing: polls happen at random points."""
    a = make(Clock(T0 + 10**12), allowed_lateness_ms=lateness, idle_timeout_ms=10**9)
    accepted, late = [], 0
    frames = []
    for i, (mod, ts, eid) in enumerate(stream):
        try:
            a.admit(ev("s", mod, ts, eid))
        except EventRejected as exc:
            assert exc.reason == "too_late"
            late += 1
            continue
        accepted.append((mod, ts, eid, i))
        a.complete("s", eid, feat(mod))
        if polls[i]:
            frames += a.poll()
    frames += a.flush()
    assert [ids(f) for f in fused(frames)] == reference(accepted, 20 * MS)
    n_fused = sum(len(f.modalities) for f in frames)
    unmatched = sum(n for (_, o), n in a.counts.items() if o == "unmatched")
    assert n_fused + unmatched + late == len(stream)  # every event: one outcome
    assert len(skipped(frames).get("unmatched", [])) == unmatched  # ... named in a result
    # Deterministic: polling after every event gives the very same outcome.
    b = make(Clock(T0 + 10**12), allowed_lateness_ms=lateness, idle_timeout_ms=10**9)
    again = []
    for mod, ts, eid in stream:
        with contextlib.suppress(EventRejected):
            b.admit(ev("s", mod, ts, eid))
            b.complete("s", eid, feat(mod))
        again += b.poll()
    again += b.flush()
    assert [ids(f) for f in fused(again)] == [ids(f) for f in fused(frames)]
    assert b.counts == a.counts


def test_the_readme_example() -> None:
    """docs/aligner.md, "mode = nearest", step by step."""
    a = make(Clock())
    for mod, off, eid in [("image", 0, "i0"), ("audio", 8, "a8"), ("image", 40, "i40"), ("text", 45, "t45"),
                          ("audio", 70, "a70"), ("image", 200, "i200")]:  # fmt: skip
        push(a, mod, off, eid)
    frames = fused(a.poll() + a.flush())
    assert [ids(f) for f in frames] == [
        {"image": ["i0"], "audio": ["a8"]},
        {"image": ["i40"], "text": ["t45"]},
        {"image": ["i200"]},
    ]
    assert a.counts[("audio", "unmatched")] == 1
