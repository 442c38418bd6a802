"""The aligner's rules, each with a hand-moved clock."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engine.align.aligner import Aligner
from engine.config.models import AlignerConfig
from engine.contracts.errors import EventRejected
from engine.contracts.records import FrameRecord
from engine.contracts.types import ContentType, Features, FusedFrame, InputEvent
from engine.contracts.vocabulary import FeatureVocabulary
from processors.vocabulary import AUDIO

MS = 1_000_000
T0 = 1_764_000_000_000 * MS  # a window boundary for every window length used here


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def ev(source: str, modality: str, ts: int, eid: str | None = None) -> InputEvent:
    return InputEvent(
        subject=f"autoglm.in.{source}.{modality}",
        source=source,
        modality=modality,  # type: ignore[arg-type]
        ts_ns=ts,
        content_type=ContentType("x/y"),
        payload=b"",
        event_id=eid or f"{source}-{modality}-{ts}",
    )


def feat(modality: str, value: float = 1.0, text: str | None = None) -> Features:
    if modality == "audio":  # as the mfcc processor makes them: its vocabulary names the frames MFCCs
        frames = np.full((2, 3), value, np.float32)
        return Features("audio", frames=frames, stats={"loudness_dbfs": value}, vocabulary=AUDIO)
    return Features(
        modality,  # type: ignore[arg-type]
        embedding=np.full(4, value, np.float32),
        stats={"brightness": value},
        text=text,
    )


def make(clock: Clock, **cfg: Any) -> Aligner:
    base: dict[str, Any] = {"window_ms": 100, "allowed_lateness_ms": 0, "idle_timeout_ms": 1000}
    return Aligner(AlignerConfig(**{**base, **cfg}), clock)


def push(a: Aligner, e: InputEvent, value: float = 1.0) -> None:
    """Admit and complete at once (the processor was instant)."""
    a.admit(e)
    a.complete(
        e.source, e.event_id, feat(e.modality, value, text=e.event_id if e.modality == "text" else None)
    )


def ids(frame: FusedFrame) -> dict[str, list[str]]:
    return {m: list(f.event_ids) for m, f in frame.modalities.items()}


def test_window_closes_when_the_watermark_passes_its_end() -> None:
    a = make(Clock())
    push(a, ev("s", "image", T0 + 10 * MS, "a"))
    push(a, ev("s", "text", T0 + 99 * MS, "b"))
    assert a.poll() == []
    push(a, ev("s", "image", T0 + 100 * MS, "c"))  # exactly at the boundary: next window
    [frame] = a.poll()
    assert (frame.start_ns, frame.end_ns) == (T0, T0 + 100 * MS)
    assert ids(frame) == {"image": ["a"], "text": ["b"]}
    assert frame.missing == ("audio",)


def test_out_of_order_within_lateness_lands_in_the_right_window() -> None:
    a = make(Clock(), allowed_lateness_ms=50)
    push(a, ev("s", "image", T0 + 10 * MS, "a"))
    push(a, ev("s", "image", T0 + 140 * MS, "c"))  # watermark 90 ms: window 0 still open
    push(a, ev("s", "image", T0 + 20 * MS, "b"))  # late but allowed
    assert a.poll() == []
    push(a, ev("s", "image", T0 + 150 * MS, "d"))  # watermark 100 ms: window 0 closes
    [frame] = a.poll()
    assert ids(frame) == {"image": ["a", "b"]}  # time order, not arrival order


def test_beyond_lateness_is_too_late_and_counted() -> None:
    a = make(Clock(), allowed_lateness_ms=50)
    push(a, ev("s", "image", T0 + 10 * MS))
    push(a, ev("s", "image", T0 + 150 * MS))
    with pytest.raises(EventRejected) as info:
        a.admit(ev("s", "audio", T0 + 99 * MS))
    assert info.value.reason == "too_late"
    assert "closed" in info.value.message
    assert a.counts[("audio", "too_late")] == 1
    assert a.source_counts("s")[("audio", "too_late")] == 1
    a.admit(ev("s", "audio", T0 + 100 * MS))  # first instant of the open window is fine


def test_equal_timestamps_are_all_kept_in_arrival_order() -> None:
    a = make(Clock())
    for eid in ("x", "y", "z"):
        push(a, ev("s", "text", T0 + 5 * MS, eid))
    [frame] = a.flush()
    assert ids(frame) == {"text": ["x", "y", "z"]}
    assert frame.modalities["text"].summary["texts"] == ["x", "y", "z"]


def test_a_quiet_source_closes_after_idle_timeout_of_engine_time() -> None:
    clock = Clock()
    a = make(clock, idle_timeout_ms=500)
    push(a, ev("quiet", "image", T0 + 10 * MS, "q"))
    clock.now += 499 * MS
    assert a.poll() == []
    clock.now += 1 * MS
    [frame] = a.poll()
    assert ids(frame) == {"image": ["q"]}
    assert a.idle_closed == 1
    with pytest.raises(EventRejected, match="too_late"):
        a.admit(ev("quiet", "image", T0 + 20 * MS))  # its window is gone


def test_future_timestamps_are_refused_without_moving_the_watermark() -> None:
    a = make(Clock(), max_future_ms=1000)
    with pytest.raises(EventRejected) as info:
        a.admit(ev("s", "image", T0 + 1001 * MS))
    assert info.value.reason == "bad_timestamp"
    push(a, ev("s", "image", T0 + 5 * MS, "ok"))  # the source was not pushed into the future
    assert a.poll() == []


def test_duplicates_in_the_open_state_are_fused_once() -> None:
    a = make(Clock())
    push(a, ev("s", "image", T0 + 1 * MS, "same"))
    with pytest.raises(EventRejected) as info:
        a.admit(ev("s", "image", T0 + 2 * MS, "same"))
    assert info.value.reason == "duplicate"
    [frame] = a.flush()
    assert ids(frame) == {"image": ["same"]}
    assert a.counts[("image", "duplicate")] == 1


def test_pending_events_hold_their_window_and_later_ones_back() -> None:
    a = make(Clock())
    slow = ev("s", "image", T0 + 1 * MS, "slow")
    a.admit(slow)
    push(a, ev("s", "image", T0 + 150 * MS, "w1"))
    push(a, ev("s", "image", T0 + 250 * MS, "w2"))
    assert a.poll() == []  # window 0 sealed but its event is still processing
    a.complete("s", "slow", feat("image"))
    frames = a.poll()
    assert [ids(f) for f in frames] == [{"image": ["slow"]}, {"image": ["w1"]}]


def test_discarded_events_leave_no_frame_behind() -> None:
    a = make(Clock())
    bad = ev("s", "image", T0 + 1 * MS, "bad")
    a.admit(bad)
    a.discard("s", "bad")
    push(a, ev("s", "image", T0 + 150 * MS, "later"))
    assert a.poll() == []  # window 0 had only the rejected event


def test_require_with_drop_counts_the_dropped_events() -> None:
    a = make(Clock(), require=("image",), on_missing="drop")
    push(a, ev("s", "text", T0 + 1 * MS))
    push(a, ev("s", "image", T0 + 101 * MS))
    frames = a.flush()
    # The text-only window is not fused, but its event is named in a result of its own.
    assert [ids(f) for f in frames] == [{}, {"image": [f"s-image-{T0 + 101 * MS}"]}]
    assert frames[0].skipped == {"missing_dropped": (f"s-text-{T0 + 1 * MS}",)}
    assert a.counts[("text", "missing_dropped")] == 1
    assert a.counts[("image", "fused")] == 1


def test_require_with_emit_fills_missing() -> None:
    a = make(Clock(), require=("image",), on_missing="emit")
    push(a, ev("s", "text", T0 + 1 * MS))
    [frame] = a.flush()
    assert frame.missing == ("image", "audio")


def test_open_window_cap_seals_the_oldest() -> None:
    a = make(Clock(), allowed_lateness_ms=10_000, max_open_windows=2)
    push(a, ev("s", "image", T0 + 1 * MS, "w0"))
    push(a, ev("s", "image", T0 + 101 * MS, "w1"))
    push(a, ev("s", "image", T0 + 201 * MS, "w2"))
    [frame] = a.poll()
    assert ids(frame) == {"image": ["w0"]}
    assert a.counts[("image", "evicted")] == 1
    with pytest.raises(EventRejected, match="too_late"):
        a.admit(ev("s", "image", T0 + 2 * MS))


def test_source_cap_evicts_the_least_recently_seen_and_emits_it() -> None:
    a = make(Clock(), max_sources=2)
    push(a, ev("a", "image", T0 + 1 * MS, "a1"))
    push(a, ev("b", "image", T0 + 1 * MS, "b1"))
    push(a, ev("a", "image", T0 + 2 * MS, "a2"))  # a is now more recent than b
    push(a, ev("c", "image", T0 + 1 * MS, "c1"))  # evicts b
    frames = a.poll()
    assert [(f.source, ids(f)) for f in frames] == [("b", {"image": ["b1"]})]
    assert a.sources_evicted == 1


def test_evicted_source_with_pending_slots_still_completes() -> None:
    a = make(Clock(), max_sources=1)
    a.admit(ev("a", "image", T0 + 1 * MS, "a1"))
    push(a, ev("b", "image", T0 + 1 * MS, "b1"))  # evicts a while a1 is processing
    assert a.poll() == []
    a.complete("a", "a1", feat("image"))
    assert [f.source for f in a.poll()] == ["a"]


def test_memory_stays_bounded_with_many_one_shot_sources() -> None:
    a = make(Clock(), max_sources=1000)
    for i in range(10_000):
        push(a, ev(f"s{i}", "text", T0 + 1 * MS))
        if i % 500 == 0:
            a.poll()
    a.poll()
    assert len(a._sources) <= 1000
    assert a.sources_evicted == 9000


def test_fusion_aggregates_per_modality() -> None:
    a = make(Clock())
    push(a, ev("s", "image", T0 + 1 * MS), 1.0)
    push(a, ev("s", "image", T0 + 2 * MS), 3.0)
    push(a, ev("s", "audio", T0 + 3 * MS), 2.0)
    push(a, ev("s", "audio", T0 + 4 * MS), 4.0)
    [frame] = a.flush()
    img = frame.modalities["image"]
    assert [s["brightness"] for s in img.per_event] == [1.0, 3.0]
    assert img.summary["count"] == 2
    assert img.summary["brightness"] == 2.0
    assert img.embedding is not None and np.allclose(img.embedding, 2.0)
    aud = frame.modalities["audio"].summary
    assert aud["mfcc_mean"] == [3.0, 3.0]
    assert aud["mfcc_std"] == [1.0, 1.0]
    assert aud["loudness_dbfs"] == 3.0


def test_same_events_and_clock_give_the_same_bytes() -> None:
    def run() -> list[bytes]:
        clock = Clock()
        a = make(clock, allowed_lateness_ms=30)
        out = []
        for i, (mod, off) in enumerate(
            [("image", 5), ("text", 40), ("audio", 20), ("image", 130), ("text", 110), ("audio", 101)]
        ):
            clock.now += MS
            push(a, ev("s", mod, T0 + off * MS, f"e{i}"), float(i))
            out += [FrameRecord.from_frame(f).to_bytes() for f in a.poll()]
        return out + [FrameRecord.from_frame(f).to_bytes() for f in a.flush()]

    first = run()
    assert len(first) == 2
    assert first == run()


def test_the_readme_timeline() -> None:
    """The example in docs/aligner.md, "The aligner", step by step."""
    a = make(Clock(), window_ms=1000, allowed_lateness_ms=300)
    for eid, mod, off in [("i100", "image", 100), ("t900", "text", 900), ("a1200", "audio", 1200)]:
        push(a, ev("s", mod, T0 + off * MS, eid))
        assert a.poll() == []
    push(a, ev("s", "image", T0 + 950 * MS, "i950"))  # out of order, within 300 ms
    assert a.poll() == []
    push(a, ev("s", "image", T0 + 1350 * MS, "i1350"))  # watermark 1050: window 0 closes
    [frame] = a.poll()
    assert ids(frame) == {"image": ["i100", "i950"], "text": ["t900"]}
    with pytest.raises(EventRejected, match="too_late"):
        a.admit(ev("s", "text", T0 + 800 * MS, "t800"))


def test_the_one_event_fast_path_fuses_exactly_like_the_general_one() -> None:
    from engine.align.aligner import _fuse_many, _fuse_one, _Slot

    rng = np.random.default_rng(3)
    feats = Features(
        "audio",
        embedding=rng.normal(size=8).astype(np.float32),
        frames=rng.normal(size=(13, 5)).astype(np.float32),
        stats={"loudness_dbfs": -12.345678, "voice_ratio": 0.5},
        text="words",
        labels=("a", "b", "a"),
        attachment=b"jpeg",
    )
    slot = _Slot("e1", "audio", 5, 1, features=feats, arrived=7, traceparent=None, done=9)
    one, many = _fuse_one(slot), _fuse_many([slot])
    assert one.summary == many.summary and one.per_event == many.per_event
    assert (one.event_ids, one.timestamps, one.arrivals, one.done) == (
        many.event_ids,
        many.timestamps,
        many.arrivals,
        many.done,
    )
    assert one.attachment == many.attachment and np.array_equal(one.embedding, many.embedding)


# -- a window must never be lost to fusion ---------------------------------------------------


def test_ragged_embeddings_fuse_the_first_size_and_count_the_others() -> None:
    clock = Clock()
    a = make(clock)
    for eid, size in (("e1", 4), ("e2", 8), ("e3", 4)):
        e = ev("evil", "text", T0 + int(eid[1]) * MS, eid)
        a.admit(e)
        a.complete("evil", eid, Features("text", embedding=np.ones(size, np.float32)))
    push(a, ev("good", "text", T0 + 1 * MS, "g1"))
    clock.now = T0 + 10_000 * MS  # both sources go quiet: their windows close in one poll
    frames = {f.source: f for f in a.poll()}
    assert set(frames) == {"evil", "good"}
    text = frames["evil"].modalities["text"]
    assert text.event_ids == ("e1", "e2", "e3")
    assert text.summary["embedding_dim"] == 4 and text.summary["embeddings_left_out"] == 1
    assert ids(frames["good"]) == {"text": ["g1"]}


class _Broken(FeatureVocabulary):
    def fuse(self, features: Any) -> Any:
        raise ValueError("a processor's vocabulary cannot fuse its own features")


def test_a_window_that_cannot_fuse_names_its_events_and_the_others_still_come_out() -> None:
    clock = Clock()
    a = make(clock)
    for eid in ("b1", "b2"):
        a.admit(ev("bad", "text", T0 + int(eid[1]) * MS, eid))
        a.complete("bad", eid, Features("text", stats={"x": 1.0}, vocabulary=_Broken()))
    push(a, ev("bad", "image", T0 + 3 * MS, "i1"))
    push(a, ev("good", "text", T0 + 1 * MS, "g1"))
    push(a, ev("bad", "text", T0 + 150 * MS, "later"))  # the next window of the same source
    clock.now = T0 + 10_000 * MS
    frames = a.poll()
    by = {(f.source, f.start_ns): f for f in frames}
    bad = by[("bad", T0)]
    assert bad.modalities == {} and set(bad.skipped["fuse_error"]) == {"b1", "b2", "i1"}
    assert FrameRecord.from_frame(bad).skipped == {"fuse_error": ["b1", "b2", "i1"]}
    assert ids(by[("good", T0)]) == {"text": ["g1"]}
    assert ids(by[("bad", T0 + 100 * MS)]) == {"text": ["later"]}
    assert a.counts[("text", "fuse_error")] == 2 and a.counts[("image", "fuse_error")] == 1
    assert a.open_windows == 0 and a.pending == 0
