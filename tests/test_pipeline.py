"""The sans-I/O pipeline, driven by hand: messages and a hand-moved clock in,
records and acks out; no NATS, no event loop."""

from __future__ import annotations

from typing import Any

import orjson

from engine.config.models import parse_config
from engine.contracts.messages import Finish, Message, Publish
from engine.glm.trigger import ChangeTrigger
from engine.pipeline.pipeline import Ask, Batch, Output, Pipeline
from engine.runtime.build import build_aligner, build_routes
from engine.wire.codec import ID_HEADER, TIMESTAMP_HEADER, Limits

MS = 1_000_000
T0 = 1_700_000_000_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def pipeline(clock: Clock, max_queue: int = 8, **route: Any) -> Pipeline:
    cfg = parse_config(
        {
            "nats": {"subject_prefix": "p"},
            "routes": [
                {
                    "modality": "text",
                    "processor": "passthrough",
                    "batch": {"max_batch_size": 4, "max_wait_ms": 5, "max_queue": max_queue},
                    **route,
                }
            ],
            "aligner": {"window_ms": 100, "allowed_lateness_ms": 0, "idle_timeout_ms": 300},
        },
        env={},
    )
    return Pipeline(
        build_routes(cfg), build_aligner(cfg.aligner, clock), prefix="p", limits=Limits(), clock=clock
    )


def msg(
    eid: str, ts: int, *, body: bytes = b"hi", source: str = "cam", delivery: str | None = None
) -> Message:
    headers = {TIMESTAMP_HEADER: str(ts), ID_HEADER: eid, "Content-Type": "text/plain"}
    return Message(f"p.in.{source}.text", headers, b"hi", delivery if delivery is not None else f"js-{eid}")


def run(p: Pipeline, batches: list[Batch]) -> list[Output]:
    out: list[Output] = []
    for b in batches:
        out += p.batch_done(b, b.route.process(b.events))
    return out


def finish(p: Pipeline, outputs: list[Output]) -> list[Publish]:
    """What the GLM stage would send back for each Ask (no model here)."""
    done: list[Publish] = []
    for o in outputs:
        if isinstance(o, Ask):
            done.append(p.result(o.frame, {"prompt": None, "answer": None, "glm": {"backend": "none"}}))
        elif isinstance(o, Publish):
            done.append(o)
    return done


def test_an_event_goes_through_to_a_result_that_acks_its_delivery() -> None:
    clock = Clock()
    p = pipeline(clock)
    assert p.receive(msg("a", T0)) == []
    assert p.batches() == []  # neither full nor max_wait old yet
    assert p.deadline() == T0 + 5 * MS
    clock.now += 5 * MS
    [batch] = p.batches()
    assert [e.event_id for e in batch.events] == ["a"]
    assert run(p, [batch]) == [] and p.poll() == []  # the window is still open
    clock.now += 400 * MS  # past the idle timeout
    [result] = finish(p, p.poll())
    record = orjson.loads(result.payload)
    assert result.subject == "p.out.cam" and result.kind == "result"
    assert record["events"] == {"text": ["a"]} and result.acks == ("js-a",)
    assert result.headers[ID_HEADER] == record["result_id"]


def test_a_malformed_message_is_one_rejection_that_finishes_its_delivery() -> None:
    p = pipeline(Clock())
    [rejection] = p.receive(Message("p.in.cam.text", {TIMESTAMP_HEADER: "１２"}, b"x", "js9"))
    assert isinstance(rejection, Publish) and rejection.kind == "rejection"
    assert rejection.subject == "p.dlq.cam" and rejection.acks == ("js9",)
    assert orjson.loads(rejection.payload)["reason"] == "bad_timestamp"


def test_no_more_batches_in_flight_than_workers() -> None:
    clock = Clock()
    p = pipeline(clock)  # workers = 1 (the default)
    for i in range(4):
        p.receive(msg(f"e{i}", T0 + i))
    [first] = p.batches()  # four waiting = max_batch_size
    p.receive(msg("late", T0 + 10))
    clock.now += 10 * MS
    assert p.batches() == [] and p.deadline() is None  # the one worker is busy
    run(p, [first])
    [second] = p.batches()
    assert [e.event_id for e in second.events] == ["late"]


def test_a_batch_that_fails_rejects_each_of_its_events() -> None:
    clock = Clock()
    p = pipeline(clock)
    for i in range(4):
        p.receive(msg(f"e{i}", T0 + i))
    [batch] = p.batches()
    rejections = p.batch_failed(batch, RuntimeError("boom"))
    assert [r.acks for r in rejections if isinstance(r, Publish)] == [(f"js-e{i}",) for i in range(4)]
    assert {orjson.loads(r.payload)["reason"] for r in rejections if isinstance(r, Publish)} == {
        "processor_error"
    }
    assert p.stats.batch_errors == 1 and p.batches(force=True) == []  # the worker is free, nothing queued


def test_complete_intake_pauses_instead_of_dropping() -> None:
    clock = Clock()
    p = pipeline(clock, max_queue=3, intake="complete")
    for i in range(3):  # max_queue = 3
        assert p.receive(msg(f"e{i}", T0 + i)) == []
    assert not p.paused
    assert p.receive(msg("e3", T0 + 3)) == [] and p.paused
    clock.now += 5 * MS
    [batch] = p.batches()  # room again: the parked event is queued, nothing dropped
    assert not p.paused
    run(p, [batch])
    clock.now += 5 * MS
    [rest] = p.batches()
    assert [e.event_id for e in batch.events + rest.events] == ["e0", "e1", "e2", "e3"]
    assert p.stats.intake_waits == 1 and sum(p.stats.rejected.values()) == 0


def test_real_time_drops_the_oldest_and_rejects_the_dropped_event_and_finishes_its_delivery() -> None:
    p = pipeline(Clock(), max_queue=3, intake="real_time")
    for i in range(3):
        p.receive(msg(f"e{i}", T0 + i))
    [dropped] = p.receive(msg("e3", T0 + 3))
    assert isinstance(dropped, Publish) and dropped.acks == ("js-e0",)
    assert orjson.loads(dropped.payload)["reason"] == "overloaded"


def test_real_time_skips_stale_events_and_lists_them_in_the_result() -> None:
    clock = Clock()
    p = pipeline(clock, intake="real_time", max_staleness_ms=50)
    p.receive(msg("old", T0 - 100 * MS))
    p.receive(msg("new", T0))
    clock.now += 5 * MS
    [batch] = p.batches()
    assert [e.event_id for e in batch.events] == ["new"]
    run(p, [batch])
    clock.now += 400 * MS
    records = [orjson.loads(r.payload) for r in finish(p, p.poll())]
    assert {e for r in records for e in r.get("skipped", {}).get("stale", [])} == {"old"}
    assert p.stats.stale["text"] == 1


def test_a_second_copy_of_a_held_event_is_acked_with_its_result() -> None:
    clock = Clock()
    p = pipeline(clock)
    p.receive(msg("a", T0, delivery="js1"))
    assert p.receive(msg("a", T0, delivery="js2")) == []  # the same event, delivered again
    clock.now += 5 * MS
    run(p, p.batches())
    clock.now += 400 * MS
    [result] = finish(p, p.poll())
    assert sorted(result.acks) == ["js1", "js2"]


def test_an_event_stored_before_a_crash_is_finished_not_processed() -> None:
    p = pipeline(Clock())
    p.stored_before = lambda key, delivery: key == ("cam", "a")
    assert p.receive(msg("a", T0, delivery="js5")) == [Finish(("js5",))]
    assert p.batches(force=True) == []


def test_a_bug_while_taking_a_message_becomes_its_rejection(monkeypatch: Any) -> None:
    clock = Clock()
    p = pipeline(clock)
    route = p.routes[0]

    def broken(event: Any, now: int) -> None:
        raise ValueError("planted")

    monkeypatch.setattr(route.batcher, "offer", broken)
    [rejection] = p.receive(msg("a", T0, delivery="js3"))
    record = orjson.loads(rejection.payload)  # type: ignore[union-attr]
    assert record["reason"] == "internal_error" and "planted" in record["message"]
    assert rejection.acks == ("js3",)  # type: ignore[union-attr]
    assert p.aligner.pending == 0  # its slot in the window was freed


def test_a_replaced_route_finishes_its_queue_before_it_is_retired() -> None:
    clock = Clock()
    p = pipeline(clock)
    old = p.routes[0]
    p.receive(msg("a", T0))
    p.swap_routes([])
    assert p.retired() == []  # still has a queued event
    clock.now += 5 * MS
    [batch] = p.batches()
    assert batch.route is old
    run(p, [batch])
    assert p.retired() == [old]


def test_the_glm_trigger_decides_in_the_pipeline() -> None:
    clock = Clock()
    p = pipeline(clock)
    p.trigger = ChangeTrigger(threshold=0.3, max_interval_ns=10_000 * MS)
    asks: list[Ask] = []
    for w in range(2):  # two windows of the same (featureless) scene
        clock.now = T0 + w * 1000 * MS
        assert p.receive(msg(f"e{w}", clock.now)) == []
        clock.now += 5 * MS
        run(p, p.batches())
        clock.now += 400 * MS
        asks += [o for o in p.poll() if isinstance(o, Ask)]
    assert len(asks) == 2 and asks[0].skip is None  # the first frame of a source is always sent
    assert asks[1].skip is not None and asks[1].skip.why == "no_change"


def test_a_trigger_that_fails_sends_the_frame_on_instead_of_losing_the_poll() -> None:
    """The trigger runs processors' vocabulary code; its bug must not lose frames."""
    clock = Clock()
    p = pipeline(clock)
    p.trigger = ChangeTrigger(threshold=0.3, max_interval_ns=10_000 * MS)

    def broken(frame: Any) -> Any:
        raise ValueError("matmul: size 384 is different from 512")

    p.trigger.decide = broken  # type: ignore[method-assign]
    p.receive(msg("a", T0, delivery="js1"))
    clock.now += 5 * MS
    run(p, p.batches())
    clock.now += 400 * MS
    [ask] = p.poll()
    assert isinstance(ask, Ask) and ask.skip is None and p.stats.internal_errors == 1
    [result] = finish(p, [ask])
    assert result.acks == ("js1",)
