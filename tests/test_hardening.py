"""What a hostile review broke, each made to happen again against a real server.

One event must never stop intake; a dead task must never hide behind an "ok";
a window's second part must never be deduplicated away; processed events must
never crowd out unprocessed ones; every event ends in one record.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nats.js.errors
import orjson
import pytest

from engine.contracts.types import Features, InputEvent, Modality
from engine.pipeline import pipeline as engine_app
from engine.runtime.engine import Engine
from engine.transport.jetstream import JetStreamTransport
from engine.wire.codec import encode_headers
from processors.params import PassthroughParams
from processors.registry import ProcessorSpec
from tests.conftest import Transport, collect, eventually, make_config, send, srv_stats, stats_when, stored

MS = 1_000_000


def durable(prefix: str, **nats_kw: Any) -> dict[str, Any]:
    return {"subject_prefix": prefix, "durable": True, **nats_kw}


async def health(nc: Any, prefix: str) -> dict[str, Any]:
    reply = await nc.request(f"{prefix}.svc.health", b"", timeout=2)
    data: dict[str, Any] = orjson.loads(reply.data)
    return data


async def consumer_done(nc: Any, prefix: str, timeout: float = 10.0) -> Any:
    """The engine's consumer once nothing is pending or unacked (acks travel
    asynchronously), or as it is when time runs out."""
    js = nc.jetstream()

    async def settled() -> Any:
        info = await js.consumer_info(f"{prefix.upper()}_IN", "autoglm-engine")
        return info if info.num_ack_pending == 0 and info.num_pending == 0 else None

    with contextlib.suppress(AssertionError):
        return await eventually(settled, "the consumer's acks", timeout)
    return await js.consumer_info(f"{prefix.upper()}_IN", "autoglm-engine")


async def stored_records(nc: Any, subject: str) -> list[dict[str, Any]]:
    return [body for _, body in await stored(nc, subject)]


def fused_in(records: list[dict[str, Any]]) -> list[str]:
    return [e for r in records for g in r["events"].values() for e in g]


async def stored_holding(nc: Any, subject: str, ids: set[str], timeout: float = 20.0) -> list[dict[str, Any]]:
    """The stored records once they hold ``ids`` (or as they are when time runs out)."""

    async def holding() -> list[dict[str, Any]] | None:
        records = await stored_records(nc, subject)
        return records if set(fused_in(records)) >= ids else None

    with contextlib.suppress(AssertionError):
        found: list[dict[str, Any]] = await eventually(
            holding, f"stored records of {len(ids)} events", timeout
        )
        return found
    return await stored_records(nc, subject)


def a_bug_on(payload: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plant a bug in the engine's decode step for one payload: what the
    Unicode-digit timestamp did (a ValueError where only refusals were expected)."""
    real = engine_app.decode_event

    def decode(subject: str, headers: Any, data: bytes, **kw: Any) -> InputEvent:
        if data == payload:
            raise ValueError("invalid literal for int() with base 10: '179596339822592701²'")
        return real(subject, headers, data, **kw)

    monkeypatch.setattr(engine_app, "decode_event", decode)


async def test_a_bug_on_one_message_becomes_its_dlq_record_and_intake_goes_on(
    nc: Any, nats_url: str, prefix: str, transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_bug_on(b"boom", monkeypatch)
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(transport.config(prefix))
    await engine.start(nats_url)
    t = time.time_ns()
    await send(nc, prefix, "cam", "text", b"boom", t, event_id="cam-boom")
    for i in range(5):
        await send(nc, prefix, "cam", "text", b"fine", t + i * MS, event_id=f"cam-{i}")
    await nc.flush()
    [record] = await dlq.wait_for(1)
    assert record["reason"] == "internal_error" and record["event_id"] == "cam-boom"
    assert record["message"].startswith("ValueError: invalid literal")
    await out.wait_events({f"cam-{i}" for i in range(5)})
    assert (await health(nc, prefix))["status"] == "ok"
    assert (await srv_stats(nc, prefix))["internal_errors"] == 1
    if transport.durable:
        info = await consumer_done(nc, prefix)
        assert info.num_ack_pending == 0 and info.num_pending == 0
    await engine.stop()


async def test_unicode_digits_in_every_number_are_refused_and_intake_survives(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    """A 40-byte event used to kill the durable fetch loop for good: ``int()`` of ``²``."""
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(transport.config(prefix))
    await engine.start(nats_url)
    t = time.time_ns()
    hostile = [
        {"AutoGLM-Timestamp": f"{t}²", "Content-Type": "text/plain"},
        {"AutoGLM-Timestamp": "١٧٩٥٩٦٣٣٩٨٢٢٥٩٢٧٠١", "Content-Type": "text/plain"},
        {"AutoGLM-Timestamp": str(t), "AutoGLM-Seq": "①", "Content-Type": "text/plain"},
        {"AutoGLM-Timestamp": str(t), "Content-Type": "image/x-raw;width=６４;height=1"},
        {"AutoGLM-Timestamp": str(t), "Content-Type": "audio/pcm;rate=16000;channels=²;format=s16le"},
    ]
    subjects = ["text", "text", "text", "image", "audio"]
    for i, (hdrs, mod) in enumerate(zip(hostile, subjects, strict=True)):
        await nc.publish(f"{prefix}.in.cam.{mod}", b"x" * 8, headers={**hdrs, "Nats-Msg-Id": f"cam-h{i}"})
    await send(nc, prefix, "cam", "text", b"after", t + MS, event_id="cam-after")
    await nc.flush()
    records = await dlq.wait_for(len(hostile))
    assert {r["event_id"] for r in records} == {f"cam-h{i}" for i in range(len(hostile))}
    assert all(r["reason"] in ("bad_timestamp", "bad_header") for r in records), records
    await out.wait_events({"cam-after"})
    assert (await health(nc, prefix))["status"] == "ok"
    await engine.stop()


async def test_a_message_that_keeps_failing_is_poison_after_max_deliver(
    nc: Any, nats_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backstop: even when recording the failure fails, the message is
    redelivered at most ``max_deliver`` times, then recorded as poison and ended."""
    a_bug_on(b"boom", monkeypatch)
    real_rejection = engine_app.Pipeline.rejection

    def rejection(self: engine_app.Pipeline, subject: str, headers: Any, exc: Any, *a: Any) -> Any:
        if exc.reason == "internal_error":
            raise RuntimeError("the DLQ publish itself failed")
        return real_rejection(self, subject, headers, exc, *a)

    monkeypatch.setattr(engine_app.Pipeline, "rejection", rejection)
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(make_config(prefix, nats=durable(prefix, ack_wait_s=1, max_deliver=2)))
    await engine.start(nats_url)
    t = time.time_ns()
    await send(nc, prefix, "cam", "text", b"boom", t, event_id="cam-boom")
    await send(nc, prefix, "cam", "text", b"fine", t + MS, event_id="cam-fine")
    await nc.flush()
    [record] = await dlq.wait_for(1)
    assert record["reason"] == "poison" and record["event_id"] == "cam-boom"
    await out.wait_events({"cam-fine"})
    assert (await srv_stats(nc, prefix))["jetstream"]["poisoned"] == 1
    assert isinstance(engine.transport, JetStreamTransport) and engine.transport.handler_errors == 1
    info = await consumer_done(nc, prefix)
    assert info.num_ack_pending == 0 and info.num_pending == 0
    await engine.stop()


async def test_a_dead_task_makes_the_engine_unhealthy_and_serve_exit_non_zero(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    from engine.runtime.supervisor import EXIT_FAILED
    from engine.tools.runner import serve

    engine = Engine(make_config(prefix, nats=durable(prefix)))
    await engine.start(nats_url)
    assert (await health(nc, prefix))["status"] == "ok"
    assert engine.transport is not None
    assert isinstance(engine.transport, JetStreamTransport)
    fetch = engine.transport.intakes["0"].tasks["jetstream-fetch"]
    assert fetch is not None
    fetch.cancel()  # as if it had died: it is not stopping
    await asyncio.wait_for(engine.supervisor.failed.wait(), 10)
    report = await health(nc, prefix)
    assert report["status"] == "unhealthy" and report["failure"].startswith("jetstream-fetch")
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\n[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "engine.tools.cli", "health", "--config", str(cfg), "--nats-url", nats_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 1 and b"unhealthy" in err
    # What ``autoglm run`` does with it: stop, and exit non-zero for its supervisor.
    assert await asyncio.wait_for(serve(engine, asyncio.Event()), 60) == EXIT_FAILED


async def test_a_store_failing_longer_than_ack_wait_delays_records_but_never_kills_intake(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """It used to give up after ack_wait_s: the TransportError killed the fetch
    loop for good while health said ok. The results stream going away is the
    store failing as it does while the server is away."""
    from nats.js.api import StreamConfig

    dlq = await collect(nc, f"{prefix}.dlq.>")
    out = await collect(nc, f"{prefix}.out.>")
    engine = Engine(make_config(prefix, nats=durable(prefix, ack_wait_s=1)))
    await engine.start(nats_url)
    js = nc.jetstream()
    out_stream = f"{prefix.upper()}_OUT"
    kept = (await js.stream_info(out_stream)).config
    await js.delete_stream(out_stream)
    t = time.time_ns()
    await send(nc, prefix, "cam", "text", b"x", t, content_type="video/mp4", event_id="cam-bad")
    for i in range(5):
        await send(nc, prefix, "cam", "text", b"ok", t + (i + 1) * MS, event_id=f"cam-ok-{i}")
    await nc.flush()
    # Retrying for longer than ack_wait (backoff 0.05 s doubling: 5 tries > 1.5 s), and saying so.
    await stats_when(nc, prefix, lambda s: s["store_retries"] >= 5, "five store retries", 30)
    report = await health(nc, prefix)
    assert report["status"] == "degraded" and "store_retrying" in report["degraded"]
    await js.add_stream(StreamConfig(name=out_stream, subjects=kept.subjects, duplicate_window=120))
    await dlq.wait_for(1)
    await out.wait_events({f"cam-ok-{i}" for i in range(5)}, timeout=30)
    # Every input is acked only once its record is stored: then the stream holds them all.
    info = await consumer_done(nc, prefix, 30)
    assert info.num_pending == 0 and info.num_ack_pending == 0
    # Each try reached plain subscribers; the stream kept one (heartbeated: never redelivered).
    stored = await stored_records(nc, f"{prefix}.dlq.>")
    assert [r["event_id"] for r in stored] == ["cam-bad"]
    assert (await health(nc, prefix))["status"] == "ok"
    assert engine.supervisor.failure is None
    await engine.stop()


async def test_a_window_that_grows_after_it_was_published_is_stored_as_a_second_part(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """``max_sources = 1``: source a is evicted (its window published) when b
    arrives, then sends again into the same window. Same result id before: the
    second part was dropped by the results stream and its events acked: lost."""
    engine = Engine(
        make_config(
            prefix,
            nats=durable(prefix),
            aligner={"window_ms": 60_000, "idle_timeout_ms": 500, "max_sources": 1},
        )
    )
    await engine.start(nats_url)
    t = (time.time_ns() // 60_000_000_000) * 60_000_000_000  # the start of this minute's window
    plan = [("a", "a-1"), ("b", "b-1"), ("a", "a-2"), ("b", "b-2"), ("a", "a-3")]
    for i, (src, eid) in enumerate(plan):
        await send(nc, prefix, src, "text", b"x", t + i * MS, event_id=eid)
        await nc.flush()
        # One at a time, so each arrival evicts the other source.
        await stats_when(nc, prefix, lambda s, n=i + 1: sum(s["received"].values()) >= n, f"{eid} received")
    sent = {eid for _, eid in plan}
    stored = await stored_holding(nc, f"{prefix}.out.>", sent)
    fused = fused_in(stored)
    assert sorted(fused) == sorted(sent), "an event was lost or fused twice"
    parts = [r for r in stored if r["source"] == "a"]
    assert len(parts) == 3 and len({r["result_id"] for r in parts}) == 3
    assert {r["window"]["start_ns"] for r in parts} == {t}
    info = await consumer_done(nc, prefix)
    assert info.num_ack_pending == 0
    await engine.stop()


async def test_processed_events_leave_the_input_stream_and_the_recording_keeps_them(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """The input stream used to keep processed events and refuse new ones once
    full: one camera filled the 1 GiB default in 12 minutes, then every event
    was refused for a day. Now it bounds only the unprocessed backlog."""
    js = nc.jetstream()
    engine = Engine(
        make_config(prefix, nats=durable(prefix, stream_max_bytes=20_000), aligner={"idle_timeout_ms": 200})
    )
    await engine.start(nats_url)
    out = await collect(nc, f"{prefix}.out.>")
    t = time.time_ns() - 8 * 10**9
    # 60 x 1 KiB = three times what the stream may hold: all accepted, since each
    # leaves once processed and recorded (the mirror confirms about once a second,
    # so a producer this fast meets a full backlog now and then, and waits).
    refused = 0

    async def stored_by_stream() -> Any:
        nonlocal refused
        try:
            return await js.publish(f"{prefix}.in.cam.text", b"x" * 1024, headers=hdrs)
        except nats.js.errors.ServiceUnavailableError:  # maximum bytes exceeded: backlog full
            refused += 1  # a producer holds back and tries again
            return None

    for i in range(60):
        hdrs = encode_headers(t + i * 100 * MS, "text/plain", event_id=f"cam-{i}")
        ack = await eventually(stored_by_stream, f"room for cam-{i}", 20)
        assert not ack.duplicate
    await out.wait_events({f"cam-{i}" for i in range(60)}, timeout=30)

    async def settled() -> bool:  # the mirror confirms asynchronously
        inputs = await js.stream_info(f"{prefix.upper()}_IN")
        recording = await js.stream_info(f"{prefix.upper()}_REC")
        return inputs.state.messages == 0 and recording.state.messages == 60

    await eventually(settled, "an empty input stream and a recording of 60", 20)
    await engine.stop()


class Limited:
    """A passthrough that asks its route to admit at most 10 events/s per source."""

    max_fps = 10.0

    def __init__(self, modality: Modality) -> None:
        self.modality = modality

    def prepare(self, event: InputEvent) -> int:
        return len(event.payload)

    def run(self, items: Sequence[int]) -> list[Features]:
        return [Features(self.modality) for _ in items]


class Slow(Limited):
    max_fps = 0.0

    def run(self, items: Sequence[int]) -> list[Features]:
        time.sleep(0.05)
        return super().run(items)


def make_limited(params: PassthroughParams, modality: Modality, device: str, dtype: str) -> Limited:
    return Limited(modality)


def make_slow(params: PassthroughParams, modality: Modality, device: str, dtype: str) -> Slow:
    return Slow(modality)


@pytest.fixture
def limited(use_processor: Callable[[ProcessorSpec], None]) -> None:
    use_processor(ProcessorSpec("test-limited", None, PassthroughParams, "tests.test_hardening:make_limited"))


@pytest.fixture
def slow50(use_processor: Callable[[ProcessorSpec], None]) -> None:
    use_processor(ProcessorSpec("test-slow50", None, PassthroughParams, "tests.test_hardening:make_slow"))


@pytest.mark.usefixtures("limited")
async def test_rate_limited_events_are_named_in_their_windows_result(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    out = await collect(nc, f"{prefix}.out.>")
    route = {"modality": "text", "processor": "test-limited", "batch": {"max_wait_ms": 1}}
    cfg = transport.config(
        prefix,
        routes=[route],
        aligner={"window_ms": 1000, "idle_timeout_ms": 300},
    )
    engine = Engine(cfg)
    await engine.start(nats_url)
    t = (time.time_ns() // 10**9 - 2) * 10**9
    sent = {f"cam-{i}" for i in range(20)}
    for i in range(20):  # 20 events in 200 ms at 10/s allowed: most are rate-limited
        await send(nc, prefix, "cam", "text", b"x", t + i * 10 * MS, event_id=f"cam-{i}")
    await nc.flush()
    await out.wait_events(sent)
    [result] = [body for _, _, body in out.items]
    limited = result["skipped"]["rate_limited"]
    assert len(limited) == (await srv_stats(nc, prefix))["rate_limited"]["text"] > 0
    assert sorted(result["events"]["text"] + limited) == sorted(sent)
    await engine.stop()


@pytest.mark.usefixtures("slow50")
async def test_complete_intake_waiting_for_room_does_not_make_sources_idle(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    """While intake waits for room in a slow route, the events exist but are not
    read: the idle timeout used to seal the window and refuse them as too_late
    (149 of 200 in-order frames)."""
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    route = {"modality": "image", "processor": "test-slow50", "batch": {"max_batch_size": 1, "max_queue": 2}}
    cfg = transport.config(
        prefix,
        routes=[route],
        # 40 frames at 50 ms each = 2 s of work in a 10 s window; quiet means idle after 100 ms
        aligner={"window_ms": 10_000, "idle_timeout_ms": 100, "allowed_lateness_ms": 0},
    )
    engine = Engine(cfg)
    await engine.start(nats_url)
    t = (time.time_ns() // 10**10) * 10**10
    sent = {f"cam-{i}" for i in range(40)}
    for i in range(40):
        await send(nc, prefix, "cam", "image", b"x", t + i * MS, event_id=f"cam-{i}")
    await nc.flush()
    await out.wait_until(
        lambda: set(out.event_ids()) | {r["event_id"] for _, _, r in dlq.items} >= sent,
        "every frame in a result or a DLQ record",
        timeout=30,
    )
    assert not dlq.items, [r["reason"] for _, _, r in dlq.items]
    assert (await srv_stats(nc, prefix))["intake_waits"] > 0
    assert sorted(out.event_ids()) == sorted(sent)
    await engine.stop()


@pytest.mark.parametrize("then", ["restart", "killed while rebuilding the consumer"])
async def test_after_a_crash_events_already_in_a_stored_result_are_acked_not_fused_again(
    nc: Any, nats_url: str, prefix: str, then: str
) -> None:
    """kill -9 between a result's PubAck and its events' acks: the events come back
    and used to be fused a second time (their rebuilt window has another id). A
    second kill, after the consumer was deleted and before it was made again,
    must not turn the read-back off."""
    engine = Engine(make_config(prefix, nats=durable(prefix)))
    await engine.start(nats_url)
    await engine.stop()
    js = nc.jetstream()
    t = time.time_ns() - 5 * 10**9
    t -= t % (100 * MS)
    for i in range(1, 5):
        await js.publish(
            f"{prefix}.in.cam.text",
            b"x",
            headers=encode_headers(t + i * MS, "text/plain", event_id=f"cam-{i}"),
        )
    # The engine that died: it holds all four unacked, and had stored a result of two.
    dead = await js.pull_subscribe(f"{prefix}.in.>", durable="autoglm-engine", stream=f"{prefix.upper()}_IN")
    assert len(await dead.fetch(4, timeout=5)) == 4
    earlier = {
        "result_id": f"cam:{t}:earlier",
        "source": "cam",
        "window": {"start_ns": t, "end_ns": t + 100 * MS},
        "events": {"text": ["cam-1", "cam-2"]},
    }
    await js.publish(f"{prefix}.out.cam", orjson.dumps(earlier), headers={"Nats-Msg-Id": f"cam:{t}:earlier"})
    if then != "restart":
        await js.delete_consumer(f"{prefix.upper()}_IN", "autoglm-engine")
    engine = Engine(make_config(prefix, nats=durable(prefix)))
    await engine.start(nats_url)
    stored = await stored_holding(nc, f"{prefix}.out.>", {"cam-3", "cam-4"})
    fused = sorted(fused_in(stored))
    assert fused == ["cam-1", "cam-2", "cam-3", "cam-4"], fused
    assert (await srv_stats(nc, prefix))["jetstream"]["recovered"] == 2
    info = await consumer_done(nc, prefix)
    assert info.num_ack_pending == 0 and info.num_pending == 0
    await engine.stop()


def raw_publish(url: str, subject: bytes, headers: bytes, body: bytes) -> None:
    """HPUB with exact bytes, as any non-Python client may send them."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.recv(4096)  # INFO
        hdr = b"NATS/1.0\r\n" + headers + b"\r\n"
        s.sendall(
            b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'
            + b"HPUB %s %d %d\r\n" % (subject, len(hdr), len(hdr) + len(body))
            + hdr
            + body
            + b"\r\nPING\r\n"
        )
        while b"PONG" not in s.recv(4096):  # the server has it
            pass


async def test_a_subject_that_is_not_utf8_is_refused_and_the_engine_still_hears(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    """nats-py decoded subjects strictly: one ``<prefix>.in.\\xff.text`` ended its read
    loop while it still said connected. The engine heard nothing more, health
    requests went unanswered, JetStream gave up on every later event."""
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(transport.config(prefix))
    await engine.start(nats_url)
    t = time.time_ns()
    hdrs = b"AutoGLM-Timestamp: %d\r\nContent-Type: text/plain\r\nNats-Msg-Id: evil-1\r\n" % t
    await asyncio.to_thread(raw_publish, nats_url, prefix.encode() + b".in.\xff.text", hdrs, b"boom")
    for i in range(5):
        await send(nc, prefix, "cam", "text", b"after", t + i * MS, event_id=f"cam-after-{i}")
    await nc.flush()
    [record] = await dlq.wait_for(1)
    assert record["reason"] == "bad_subject" and record["subject"] == f"{prefix}.in.\ufffd.text"
    assert dlq.items[0][0] == f"{prefix}.dlq._"
    await out.wait_events({f"cam-after-{i}" for i in range(5)})
    assert (await health(nc, prefix))["status"] == "ok"
    await engine.stop()


async def test_a_nats_client_that_stops_reading_fails_the_engine(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    """Connected and deaf is the worst state there is: it must end in a restart."""
    engine = Engine(transport.config(prefix))
    await engine.start(nats_url)
    engine._nc._reading_task.cancel()  # whatever ends it behind our back
    await asyncio.wait_for(engine.supervisor.failed.wait(), 10)
    assert engine.supervisor.failure is not None and engine.supervisor.failure.startswith("nats-reader")
    await engine.stop()


def test_a_loop_with_no_progress_and_no_reason_is_hung() -> None:
    from engine.runtime.supervisor import Supervisor

    sup = Supervisor()
    now = time.monotonic()
    sup.check_progress("fetch", now, 60)
    assert sup.failure is None
    sup.degrade("store_retrying")  # explained: a store waits for the server
    sup.check_progress("fetch", now - 120, 60)
    assert sup.failure is None
    sup.recover("store_retrying")
    sup.check_progress("fetch", now - 120, 60)  # it just cleared: the loop gets its time
    assert sup.failure is None
    sup.calm_since -= 120
    sup.check_progress("fetch", now - 120, 60)
    assert sup.failure is not None and sup.failure.startswith("fetch: no progress")


def test_a_reason_held_twice_clears_when_both_holders_are_done() -> None:
    """Two stores retrying at once: the first that succeeds must not clear the
    reason while the other still waits (health would say ok, and a fetch loop
    held by the second would then count as hung and exit)."""
    from engine.runtime.supervisor import Supervisor

    sup = Supervisor()
    sup.degrade("store_retrying")
    sup.degrade("store_retrying")
    sup.recover("store_retrying")
    assert sup.status == "degraded" and "store_retrying" in sup.report()["degraded"]
    sup.calm_since -= 120
    sup.check_progress("fetch", time.monotonic() - 120, 60)
    assert sup.failure is None  # still explained by the second store
    sup.recover("store_retrying")
    assert sup.status == "ok"
    sup.recover("store_retrying")  # one recover too many changes nothing
    assert sup.status == "ok" and sup.failure is None


async def test_an_object_whose_chunks_never_come_is_object_missing_and_intake_goes_on(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    """nats-py waits for chunks without a limit: metadata alone (chunks expired
    first, or a producer that publishes only metadata) held the fetch loop for good."""
    import base64
    import hashlib
    import uuid

    from engine.wire.claimcheck import OBJECT_REF

    bucket = f"{prefix}-objects"
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(transport.config(prefix, nats={"object_bucket": bucket, "object_fetch_timeout_s": 1}))
    await engine.start(nats_url)
    js = nc.jetstream()
    data = b"never stored"
    digest = hashlib.sha256(data)
    meta = {
        "name": "ghost",
        "bucket": bucket,
        "nuid": uuid.uuid4().hex,
        "size": len(data),
        "chunks": 1,
        "digest": "SHA-256=" + base64.urlsafe_b64encode(digest.digest()).decode(),
    }
    await js.publish(f"$O.{bucket}.M.{base64.urlsafe_b64encode(b'ghost').decode()}", orjson.dumps(meta))
    ref = {"bucket": bucket, "name": "ghost", "content_type": "text/plain", "size": len(data)}
    t = time.time_ns()
    await nc.publish(
        f"{prefix}.in.cam.text",
        orjson.dumps({**ref, "sha256": digest.hexdigest()}),
        headers=encode_headers(t, OBJECT_REF, event_id="cam-ghost"),
    )
    for i in range(3):
        await send(nc, prefix, "cam", "text", b"after", t + (i + 1) * MS, event_id=f"cam-after-{i}")
    await nc.flush()
    [record] = await dlq.wait_for(1)
    assert record["reason"] == "object_missing" and "did not come within 1 s" in record["message"]
    await out.wait_events({f"cam-after-{i}" for i in range(3)})
    await engine.stop()


async def test_an_input_that_takes_the_process_down_is_found_and_recorded_as_poison(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    """Restarted by its supervisor, the engine met the same input after every
    start (the rebuilt consumer forgets delivery counts): nothing was processed
    again. Now, after max_deliver - 1 crashes in a row, it isolates the culprit."""
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\ndurable = true\nmax_deliver = 3\n'
        "[aligner]\nwindow_ms = 100\nidle_timeout_ms = 300\n"
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    js = nc.jetstream()
    # The streams exist before the first event, as with any running engine.
    first = Engine(make_config(prefix, nats=durable(prefix)))
    await first.start(nats_url)
    await first.stop()
    t = time.time_ns() - 10**9
    good = set()
    for i in range(10):
        body = b"CRASH" if i == 5 else b"fine"
        await js.publish(
            f"{prefix}.in.cam.text",
            body,
            headers=encode_headers(t + i * 50 * MS, "text/plain", event_id=f"cam-{i}"),
        )
        if i != 5:
            good.add(f"cam-{i}")
    starts, exits = 0, []
    proc = None
    try:
        for _ in range(12):  # a restart-always supervisor
            if proc is None or proc.returncode is not None:
                if proc is not None:
                    exits.append(proc.returncode)
                proc = await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "tests.crashing_engine", "run", "--config", str(cfg)),
                    *("--nats-url", nats_url),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                starts += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 20)
            if proc.returncode is None:
                break  # it stays up
        await out.wait_events(good, timeout=30)
        await dlq.wait_until(lambda: any(r["event_id"] == "cam-5" for _, _, r in dlq.items), "poison record")
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()
    [record] = [r for _, _, r in dlq.items if r["event_id"] == "cam-5"]
    assert record["reason"] == "poison"
    assert all(code == -9 for code in exits) and 2 <= len(exits) <= 4, exits
    stored = await stored_records(nc, f"{prefix}.out.>")
    fused = [e for r in stored for g in r["events"].values() for e in g]
    assert sorted(fused) == sorted(good)  # each once, none lost


async def test_producers_cannot_fill_the_store_through_the_claim_check_bucket(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """The bucket had no size limit: one producer could fill the JetStream store
    that the input and result streams need."""
    from engine.wire.claimcheck import put_payload

    bucket = f"{prefix}-objects"
    engine = Engine(make_config(prefix, nats=durable(prefix, object_bucket=bucket, object_max_bytes=100_000)))
    await engine.start(nats_url)
    js = nc.jetstream()
    assert (await js.stream_info(f"OBJ_{bucket}")).config.max_bytes == 100_000
    await put_payload(js, bucket, b"x" * 40_000, "text/plain")
    with pytest.raises(Exception, match="maximum bytes exceeded"):
        await put_payload(js, bucket, b"y" * 80_000, "text/plain")
    await engine.stop()


class Broken(Limited):
    max_fps = 0.0

    def run(self, items: Sequence[int]) -> list[Features]:
        raise RuntimeError("the model fell over")


def make_broken(params: PassthroughParams, modality: Modality, device: str, dtype: str) -> Broken:
    return Broken(modality)


@pytest.fixture
def broken(use_processor: Callable[[ProcessorSpec], None]) -> None:
    use_processor(ProcessorSpec("test-broken", None, PassthroughParams, "tests.test_hardening:make_broken"))


@pytest.mark.usefixtures("broken")
async def test_a_dlq_record_of_an_admitted_event_names_its_delivery(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """Rejected after admission (its batch failed): the record's Nats-Msg-Id is the
    input's stream sequence (JetStream only), so a redelivery after a lost ack
    stores no second one."""
    dlq = await collect(nc, f"{prefix}.dlq.>")
    route = {"modality": "text", "processor": "test-broken", "batch": {"max_wait_ms": 1}}
    engine = Engine(make_config(prefix, nats=durable(prefix), routes=[route]))
    await engine.start(nats_url)
    await send(nc, prefix, "cam", "text", b"x", time.time_ns(), event_id="cam-1")
    [record] = await dlq.wait_for(1)
    assert record["reason"] == "processor_error" and record["event_id"] == "cam-1"
    [(headers, _)] = await stored(nc, f"{prefix}.dlq.>")
    assert headers["Nats-Msg-Id"] == f"dlq:{prefix.upper()}_IN:1"
    await engine.stop()
