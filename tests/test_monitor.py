"""The monitor's aggregation, sans-I/O: records and stats rounds in, views out."""

from __future__ import annotations

from typing import Any

from engine.monitor.rates import percentile, sum_engines
from engine.monitor.state import MonitorState

T0 = 1_764_000_000_000_000_000
JPEG = b"\xff\xd8\xff\xe0fake jpeg\xff\xd9"


def result(source: str, k: int, **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "result_id": f"{source}:{T0 + k}:00",
        "source": source,
        "window": {"start_ns": T0 + k * 10**9, "end_ns": T0 + (k + 1) * 10**9},
        "events": {"image": [f"{source}-i{k}"], "audio": [f"{source}-a{k}"]},
        "missing": ["text"],
        "features": {
            "image": {"count": 1, "brightness": 0.3, "labels": ["ball", "floor"]},
            "audio": {"count": 1, "loudness_dbfs": -20.0, "voice_ratio": 0.5},
        },
        "trace_id": "0" * 32,
        "prompt": None,
        "answer": None,
        "glm": {"backend": "none"},
        "latency_ms": {"process": 1.0, "align": 2.0, "glm": 0.0, "event_to_result": float(10 + k)},
    }
    record.update(extra)
    return record


def stats(
    engine_id: str, received: dict[str, int], results: int, rejected: dict[str, int], **more: Any
) -> Any:
    data = {"status": "ok", "received": received, "results": results, "rejected": rejected, **more}
    return {
        "id": engine_id,
        "version": "1",
        "started": "2026-11-29T23:59:00.123456789Z",
        "metadata": {"subject_prefix": "autoglm"},
        "endpoints": [{"name": "health", "data": data}],
    }


def test_a_result_fills_its_sources_card_and_timeline() -> None:
    state = MonitorState()
    state.on_result(result("cam0", 0, skipped={"rate_limited": ["x", "y"]}), now=1.0)
    answered = {"backend": "openai", "model": "glm-4", "latency_ms": 5.0}
    text = {"count": 1, "texts": ["a red ball"]}
    state.on_result(
        result("cam0", 1, answer="a ball rolls", glm=answered, features={"text": text}, missing=[]), now=2.0
    )
    card = state.sources["cam0"].view()
    assert card["answer"] == "a ball rolls" and card["glm"] == "answered"
    assert card["words"] == {"text": "a red ball"}
    assert card["labels"] == ["ball", "floor"]  # from the window before: the last frame's labels
    assert card["missing"] == [] and card["skipped"] == {}
    assert card["sound"] == [[-20.0, 0.5]] and card["results"] == 2
    rows = state.timeline_of("cam0")
    assert rows is not None and [r["skipped"] for r in rows] == [{"rate_limited": 2}, {}]
    assert rows[0]["missing"] == ["text"] and rows[0]["events"] == {"image": 1, "audio": 1}
    assert [r["glm"] for r in rows] == ["none", "answered"]
    assert state.timeline_of("nobody") is None


def test_the_timeline_keeps_the_last_n_windows_and_latency_is_read_from_results() -> None:
    state = MonitorState(timeline=3)
    for k in range(10):
        state.on_result(result("cam0", k), now=float(k))
    rows = state.timeline_of("cam0")
    assert rows is not None and [r["event_to_result_ms"] for r in rows] == [17.0, 18.0, 19.0]
    assert state.overview()["latency_ms"] == {"p50": 14.0, "p99": 19.0, "n": 10}
    assert percentile([], 0.5) is None


def test_rejections_count_by_reason_keep_the_last_few_and_mark_the_source() -> None:
    state = MonitorState(keep_rejections=2)
    for i, reason in enumerate(["decode_error", "too_late", "decode_error"]):
        record = {"source": "cam1", "subject": "autoglm.in.cam1.image", "reason": reason, "message": f"m{i}"}
        state.on_rejection(record, now=float(i))
    view = state.rejections_view()
    assert view["counts"] == {"decode_error": 2, "too_late": 1}
    assert [r["message"] for r in view["last"]] == ["m2", "m1"]
    card = state.sources["cam1"].view()
    assert card["rejected"] == {"decode_error": 2, "too_late": 1}
    assert card["last_rejection"] == "decode_error: m2"
    state.on_result(result("cam1", 0), now=5.0)  # the window after says what was refused before it
    rows = state.timeline_of("cam1")
    assert rows is not None and rows[0]["rejected"] == {"decode_error": 2, "too_late": 1}
    assert state.sources["cam1"].view()["rejected"] == {}


def test_engine_totals_by_reason_win_over_what_the_monitor_saw() -> None:
    state = MonitorState()
    state.on_rejection({"source": "a", "reason": "decode_error", "message": ""}, now=0.0)
    state.on_stats([stats("e1", {}, 0, {"image:decode_error": 5, "?:bad_subject": 1})], now=1.0)
    assert state.rejections_view()["counts"] == {"decode_error": 5, "bad_subject": 1}


def test_frames_are_kept_when_a_browser_can_show_them_at_most_every_frame_every() -> None:
    state = MonitorState(frame_every=0.5)
    assert state.on_frame("cam0", "image/jpeg", JPEG, now=1.0)
    assert not state.on_frame("cam0", "image/jpeg", JPEG + b"2", now=1.2)  # too soon
    assert state.on_frame("cam0", "Image/PNG", b"\x89PNG...", now=1.6)
    assert not state.on_frame("cam1", "image/x-raw;format=bgr8;width=2;height=2", b"x" * 12, now=2.0)
    assert not state.on_frame("cam1", "image/jpeg", b"", now=2.0)
    frame = state.frames["cam0"]
    assert (frame.content_type, frame.version) == ("image/png", 2)
    assert state.sources["cam0"].view()["frame"] == 2 and "cam1" not in state.sources


def test_rates_are_the_rise_between_rounds_over_the_time_between() -> None:
    state = MonitorState()
    state.on_stats([stats("e1", {"image": 100}, 10, {})], now=10.0)
    assert state.overview()["rates"]["series"] == {}  # a first round is history, not flow
    state.on_stats([stats("e1", {"image": 130}, 13, {"image:decode_error": 2})], now=12.0)
    state.on_stats(
        [stats("e1", {"image": 5}, 1, {}), stats("e2", {"audio": 50}, 0, {})], now=13.0
    )  # e1 restarted (its totals went down: the new value is the rise); e2 is new (adds nothing yet)
    series = state.overview()["rates"]["series"]
    assert series["in:image"] == [15.0, 5.0]
    assert series["results"] == [1.5, 1.0]
    assert series["rejected:image"] == [1.0, 0.0]
    assert "in:audio" not in series
    state.on_stats([stats("e2", {"audio": 70}, 0, {})], now=14.0)  # e1 gone
    assert state.overview()["rates"]["series"]["in:audio"] == [0.0, 0.0, 20.0]
    assert [e["id"] for e in state.engines] == ["e2"]


def test_routes_and_glm_are_summed_over_engines() -> None:
    glm = {"calls": 3, "errors": 1, "skipped": {"no_change": 4}}
    batches = {"image": {"queue": 2, "batches": 3, "sizes": {"1": 1, "4": 2}}}
    state = MonitorState()
    state.on_stats(
        [
            stats("e1", {}, 0, {}, glm=glm, batches=batches, worker="w1", partitions=["0"]),
            stats("e2", {}, 0, {}, glm=glm, batches=batches, worker="w2", partitions=["1"]),
        ],
        now=1_764_000_000.0,
    )
    view = state.overview()
    assert view["routes"] == {
        "image": {"queue": 4, "batches": 6, "mean_size": 3.0, "sizes": {"1": 2, "4": 4}}
    }
    assert view["glm"] == {"calls": 6, "errors": 2, "skipped": {"no_change": 8}, "skipped_total": 8}
    assert [(e["worker"], e["partitions"]) for e in view["engines"]] == [("w1", ["0"]), ("w2", ["1"])]
    assert view["engines"][0]["uptime_s"] is not None
    assert sum_engines([])["routes"] == {}


def test_changes_since_gives_only_the_cards_that_moved() -> None:
    state = MonitorState()
    for s in range(200):
        state.on_result(result(f"cam{s}", 0), now=0.0)
    first = state.changes_since(0)
    assert first["full"] and len(first["cards"]) == 200
    state.on_result(result("cam7", 1), now=1.0)
    state.on_frame("cam9", "image/jpeg", JPEG, now=1.0)
    later = state.changes_since(first["seq"])
    assert not later["full"] and sorted(c["name"] for c in later["cards"]) == ["cam7", "cam9"]
    assert state.changes_since(later["seq"])["cards"] == []


def test_the_least_recently_heard_of_source_goes_first_past_max_sources() -> None:
    state = MonitorState(max_sources=2)
    state.on_frame("a", "image/jpeg", JPEG, now=0.0)
    state.on_result(result("b", 0), now=1.0)
    state.on_result(result("a", 0), now=2.0)
    state.on_result(result("c", 0), now=3.0)
    assert list(state.sources) == ["a", "c"] and "a" in state.frames


def test_frames_past_their_byte_budget_leave_the_oldest_source_without_one() -> None:
    state = MonitorState(max_frames_total=2 * len(JPEG))
    for k, source in enumerate(["a", "b", "c"]):
        state.on_frame(source, "image/jpeg", JPEG, now=float(k))
    assert list(state.frames) == ["b", "c"] and state.frame_bytes == 2 * len(JPEG)
    assert [state.sources[s].view()["frame"] for s in "abc"] == [0, 1, 1]
    state.on_frame("b", "image/jpeg", JPEG + b"!", now=5.0)  # b replaces its own: c is now the oldest
    assert list(state.frames) == ["b"] and state.frame_bytes == len(JPEG) + 1
