"""End to end over a real nats-server: publish like a producer, read results and DLQ.

Each test runs in both transports (the ``transport`` fixture): core NATS and
JetStream must give a producer the same results and the same DLQ records."""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import pytest
import soundfile

from engine.contracts.errors import ConfigError
from engine.contracts.types import Features, InputEvent, Modality
from engine.runtime.engine import Engine
from processors.params import PassthroughParams
from processors.registry import ProcessorSpec
from tests.conftest import Transport, collect, round_trip, send, srv_stats, until

MS = 1_000_000


async def test_multi_source_every_valid_event_in_exactly_one_result(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(transport.config(prefix, aligner={"allowed_lateness_ms": 50}))
    await engine.start(nats_url)
    base = time.time_ns()
    sent: set[str] = set()
    rng = np.random.default_rng(1)
    for step in range(30):
        for s in range(3):
            for mod in ("image", "audio", "text"):
                # +-20 ms of disorder, inside the 50 ms allowed lateness
                ts = base + step * 20 * MS + int(rng.integers(-20, 20)) * MS
                eid = f"src{s}-{mod}-{step}"
                sent.add(eid)
                await send(nc, prefix, f"src{s}", mod, b"payload", ts, event_id=eid)
    await send(nc, prefix, "src0", "image", b"x", base, content_type="video/mp4", event_id="bad-ct")
    await nc.publish(
        f"{prefix}.in.src0.image", b"x", headers={"Content-Type": "image/jpeg", "Nats-Msg-Id": "no-ts"}
    )
    await nc.publish(f"{prefix}.in.src0", b"x")
    await nc.flush()
    # Every window closes on the idle timeout; in durable mode a stop would
    # leave open windows unacked for the next engine instead of publishing them.
    await out.wait_events(sent)
    records = await dlq.wait_for(3)
    stats = await srv_stats(nc, prefix)
    await engine.stop()
    await round_trip(nc)  # what the stop published (core mode flushes windows) has reached us too
    results = [body for _, _, body in out.items]

    fused = [eid for r in results for ids in r["events"].values() for eid in ids]
    assert len(fused) == len(set(fused)), "an event appeared in two results"
    assert set(fused) == sent
    windows = Counter((r["source"], r["window"]["start_ns"]) for r in results)
    assert max(windows.values()) == 1, "a window was published twice"
    for subject, headers, body in out.items:
        assert subject == f"{prefix}.out.{body['source']}"
        assert headers["Nats-Msg-Id"] == body["result_id"]
        assert body["result_id"].startswith(f"{body['source']}:{body['window']['start_ns']}:")
        assert body["answer"] is None and body["prompt"].startswith(f"Source {body['source']}")
        assert set(body["latency_ms"]) == {"process", "align", "glm", "event_to_result"}
        assert len(body["trace_id"]) == 32
        for mod, ids in body["events"].items():
            assert body["features"][mod]["count"] == len(ids)
            for eid in ids:
                assert eid.split("-")[1] == mod
    by_id = {r["event_id"]: r for r in records}
    assert by_id["bad-ct"]["reason"] == "unsupported_content_type"
    assert by_id["no-ts"]["reason"] == "missing_timestamp"
    assert by_id["no-ts"]["subject"] == f"{prefix}.in.src0.image"
    [bad_subject] = [r for _, subj, r in [(0, s, b) for s, _, b in dlq.items] if subj == f"{prefix}.dlq._"]
    assert bad_subject["reason"] == "bad_subject"
    assert stats["rejected"] == {
        "?:bad_subject": 1,
        "image:missing_timestamp": 1,
        "image:unsupported_content_type": 1,
    }


async def test_events_out_of_order_from_three_sources_come_back_as_expected_frames(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(transport.config(prefix, aligner={"window_ms": 1000, "allowed_lateness_ms": 300}))
    await engine.start(nats_url)
    t = (time.time_ns() // 10**9 - 5) * 10**9  # a whole second, in the recent past
    plan = [  # (source, modality, offset ms) in publish order: out of order within 300 ms
        ("a", "image", 100), ("b", "text", 900), ("a", "text", 50), ("c", "audio", 1200),
        ("b", "image", 700), ("c", "audio", 950), ("a", "image", 1100), ("a", "audio", 999),
        ("b", "text", 1250), ("c", "image", 1000), ("a", "text", 2500), ("a", "image", 800),
    ]  # fmt: skip
    for i, (src, mod, off) in enumerate(plan):
        await send(nc, prefix, src, mod, b"p", t + off * MS, event_id=f"{src}{i}")
    await nc.flush()
    await out.wait_for(7)  # the last windows close on the idle timeout
    await engine.stop()
    await round_trip(nc)
    results = [body for _, _, body in out.items]
    assert len(results) == 7
    frames = {(r["source"], (r["window"]["start_ns"] - t) // 10**9): r["events"] for r in results}
    assert frames == {
        ("a", 0): {"image": ["a0"], "audio": ["a7"], "text": ["a2"]},
        ("a", 1): {"image": ["a6"]},
        ("a", 2): {"text": ["a10"]},
        ("b", 0): {"image": ["b4"], "text": ["b1"]},
        ("b", 1): {"text": ["b8"]},
        ("c", 0): {"audio": ["c5"]},
        ("c", 1): {"image": ["c9"], "audio": ["c3"]},
    }
    # a's image at 800 ms arrives after a's text at 2.5 s moved its watermark to 2.2 s.
    [late] = await dlq.wait_for(1)
    assert (late["event_id"], late["reason"]) == ("a11", "too_late")


async def test_traceparent_passes_through_to_the_result(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    out = await collect(nc, f"{prefix}.out.>")
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    engine = Engine(transport.config(prefix))
    await engine.start(nats_url)
    await send(nc, prefix, "cam", "text", b"hi", time.time_ns(), traceparent=tp)
    await nc.flush()
    await out.wait_for(1)  # closed by the 300 ms idle timeout, not by stop()
    await engine.stop()
    await round_trip(nc)
    [(_, headers, body)] = out.items
    assert headers["traceparent"] == tp
    assert body["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


class Slow:
    """A processor that takes a while per batch, to fill queues on purpose."""

    def __init__(self, modality: Modality) -> None:
        self.modality = modality

    def prepare(self, event: InputEvent) -> bytes:
        return event.payload

    def run(self, items: Sequence[bytes]) -> list[Features]:
        time.sleep(0.2)
        return [Features(self.modality) for _ in items]


def make_slow(params: PassthroughParams, modality: Modality, device: str, dtype: str) -> Slow:
    return Slow(modality)


@pytest.fixture
def slow(use_processor: Callable[[ProcessorSpec], None]) -> None:
    use_processor(ProcessorSpec("test-slow", None, PassthroughParams, "tests.test_engine:make_slow"))


@pytest.mark.usefixtures("slow")
async def test_overload_drops_are_reported_never_silent(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    dlq = await collect(nc, f"{prefix}.dlq.>")
    out = await collect(nc, f"{prefix}.out.>")
    cfg = transport.config(
        prefix,
        routes=[
            {
                "modality": "text",
                "processor": "test-slow",
                "batch": {"max_batch_size": 1, "max_queue": 2},
                # real_time applies the queue's overload policy (complete would wait)
                "intake": "real_time",
                "max_staleness_ms": 60_000,
            }
        ],
    )
    engine = Engine(cfg)
    await engine.start(nats_url)
    base = time.time_ns()
    for i in range(10):
        await send(nc, prefix, "cam", "text", b"t", base + i * MS, event_id=f"t{i}")
    await nc.flush()
    everything = {f"t{i}" for i in range(10)}
    await out.wait_until(
        lambda: {r["event_id"] for _, _, r in dlq.items} | set(out.event_ids()) >= everything,
        "every event in a result or a DLQ record",
    )
    await engine.stop()
    await round_trip(nc)
    dropped = {r["event_id"] for _, _, r in dlq.items if r["reason"] == "overloaded"}
    fused = {eid for _, _, r in out.items for ids in r["events"].values() for eid in ids}
    assert dropped, "a queue of 2 behind a 200 ms batch must overflow"
    assert dropped | fused == {f"t{i}" for i in range(10)}
    assert not dropped & fused


def _wav(samples: np.ndarray, rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def test_real_processors_reject_bad_inputs_and_keep_the_rest(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    routes = [
        {
            "modality": "image",
            "processor": "cnn",
            "device": "cpu",
            "batch": {"max_batch_size": 8, "max_wait_ms": 200},
        },
        {"modality": "audio", "processor": "mfcc", "batch": {"max_batch_size": 8, "max_wait_ms": 200}},
        {"modality": "text", "processor": "minilm", "batch": {"max_batch_size": 8, "max_wait_ms": 200}},
    ]
    engine = Engine(transport.config(prefix, routes=routes, aligner={"window_ms": 10_000}))
    await engine.start(nats_url)
    t = time.time_ns() // 10**10 * 10**10  # all events in one 10 s window
    img = np.full((48, 64, 3), 120, np.uint8)
    jpeg = cv2.imencode(".jpg", img)[1].tobytes()
    tone = (0.2 * np.sin(np.arange(16_000) / 5)).astype(np.float32)
    wav = _wav(tone)
    pcm16 = "audio/pcm;rate=16000;channels=1;format=s16le"
    f32 = "audio/pcm;rate=8000;channels=2;format=f32le"
    good = [
        ("image", jpeg, "image/jpeg", "img-ok"),
        ("image", img.tobytes(), "image/x-raw;format=bgr8;width=64;height=48", "raw-ok"),
        ("audio", wav, "audio/wav", "wav-ok"),
        ("audio", (tone * 3000).astype("<i2").tobytes(), pcm16, "pcm-ok"),
        ("audio", np.zeros(1600, "<f4").tobytes(), f32, "f32-ok"),
        ("text", "café au lait".encode(), "text/plain;charset=utf-8", "txt-ok"),
    ]
    bad = [
        ("image", jpeg[: len(jpeg) // 3], "image/jpeg", "img-corrupt", "decode_error"),
        ("audio", wav[: len(wav) // 2], "audio/wav", "wav-truncated", "decode_error"),
        ("audio", b"\x00\x01\x02", pcm16, "pcm-odd", "decode_error"),
        ("audio", np.array([0.1, np.nan, 0.2, np.inf], "<f4").tobytes(), f32, "f32-nan", "invalid_samples"),
        ("text", b"caf\xe9", "text/plain", "txt-latin1", "invalid_utf8"),
    ]
    for i, (mod, body, ct, eid, *_) in enumerate([*good, *bad]):
        # 40 ms apart: under the 30 fps limit, so no frame is rate-limited
        await send(nc, prefix, "dev", mod, body, t + i * 40 * MS, content_type=ct, event_id=eid)
    await nc.flush()
    records = await dlq.wait_for(len(bad), timeout=60)
    # the window closes on the idle timeout (a durable stop would leave it open)
    await out.wait_for(1, timeout=30)
    await engine.stop()
    await round_trip(nc)
    [result] = [body for _, _, body in out.items]
    assert {r["event_id"]: r["reason"] for r in records} == {eid: reason for *_, eid, reason in bad}
    fused = {eid for ids in result["events"].values() for eid in ids}
    assert fused == {eid for *_, eid in good}
    feats = result["features"]
    assert feats["image"]["embedding_dim"] == 576
    assert len(feats["audio"]["mfcc_mean"]) == 13
    assert feats["text"]["texts"] == ["café au lait"]


async def test_nearest_mode_and_late_subject_over_nats(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    out = await collect(nc, f"{prefix}.out.>")
    late = await collect(nc, f"{prefix}.late.>")
    cfg = transport.config(
        prefix,
        aligner={
            "mode": "nearest",
            "pivot": "image",
            "slop_ms": 20,
            "late_to": "late",
            "idle_timeout_ms": 300,
        },
    )
    engine = Engine(cfg)
    await engine.start(nats_url)
    t = time.time_ns() - 10**9
    for mod, off, eid in [("image", 0, "p0"), ("audio", 8, "a8"), ("image", 40, "p40"), ("text", 45, "t45"),
                          ("image", 200, "p200"), ("audio", 10, "a10-late")]:  # fmt: skip
        await send(nc, prefix, "cam", mod, b"x", t + off * MS, event_id=eid)
    await nc.flush()
    await out.wait_for(3)
    await engine.stop()
    await round_trip(nc)
    results = [body for _, _, body in out.items]
    assert [r["events"] for r in results] == [
        {"image": ["p0"], "audio": ["a8"]},
        {"image": ["p40"], "text": ["t45"]},
        {"image": ["p200"]},
    ]
    assert [h["Nats-Msg-Id"].rsplit(":", 1)[0] for _, h, _ in out.items] == [
        f"cam:{t}:p0",
        f"cam:{t + 40 * MS}:p40",
        f"cam:{t + 200 * MS}:p200",
    ]
    [record] = await late.wait_for(1)
    assert (record["event_id"], record["reason"]) == ("a10-late", "too_late")


async def test_results_carry_real_answers_from_an_openai_compatible_server(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    from tests.chat_server import ChatServer

    out = await collect(nc, f"{prefix}.out.>")
    async with ChatServer(lambda n, body: ("ok", f"answer {n}")) as srv:
        glm = {"backend": "openai", "base_url": srv.url, "model": "glm-4", "trigger": "every", "retries": 0}
        engine = Engine(transport.config(prefix, glm=glm))
        await engine.start(nats_url)
        base = time.time_ns()
        for s in range(3):
            await send(nc, prefix, f"cam{s}", "text", f"caption {s}".encode(), base, event_id=f"c{s}")
        await nc.flush()
        await out.wait_for(3)
        await engine.stop()
    await round_trip(nc)
    results = [body for _, _, body in out.items]
    assert sorted(r["answer"] for r in results) == ["answer 0", "answer 1", "answer 2"]
    for r in results:
        assert r["glm"]["backend"] == "openai" and r["glm"]["model"] == "glm-4"
        assert r["latency_ms"]["glm"] > 0
        assert f"Source {r['source']}" in r["prompt"]
    assert len(srv.requests) == 3


async def test_a_second_core_engine_on_the_same_prefix_is_refused(nats_url: str, prefix: str) -> None:
    """Core NATS has no leases: a second engine would split sources' windows."""
    core = Transport("core")
    first = Engine(core.config(prefix))
    await first.start(nats_url)
    try:
        second = Engine(core.config(prefix))
        with pytest.raises(
            ConfigError, match=f"nats.subject_prefix = '{prefix}': another engine already serves"
        ):
            await second.start(nats_url)
        other = Engine(core.config(prefix + "x"))  # another prefix on the same server is fine
        await other.start(nats_url)
        await other.stop()
    finally:
        await first.stop()
    again = Engine(core.config(prefix))  # once the first has stopped, the prefix is free
    await again.start(nats_url)
    await again.stop()


async def test_a_second_durable_engine_on_the_same_prefix_stands_by_and_takes_over(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """With JetStream, ownership replaces the refusal: one partition, one owner;
    the other engine waits and takes it over when the owner stops."""
    durable = Transport("jetstream")
    first, second = Engine(durable.config(prefix)), Engine(durable.config(prefix))
    await first.start(nats_url)
    await second.start(nats_url)
    try:
        assert first.transport is not None and second.transport is not None
        assert first.transport.state().partitions == ("0",) and second.transport.state().partitions == ()
        await first.stop()
        standby = second.transport
        await until(lambda: standby.state().partitions == ("0",), "the standby to take over")
        out = await collect(nc, f"{prefix}.out.>")
        await send(nc, prefix, "cam", "text", b"hello", time.time_ns(), event_id="after")
        [result] = await out.wait_for(1)
        assert result["events"] == {"text": ["after"]}
    finally:
        await first.stop()
        await second.stop()
