"""The producer SDK against a real server and engine, in both modes: the
contract's headers, the claim check above a small server's max payload, and
back-pressure with nothing lost while the engine is stopped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import nats
import numpy as np
import pytest

from engine.contracts.errors import AutoGLMError
from engine.runtime.engine import Engine
from engine.runtime.server import EmbeddedServer
from engine.sources.producer import Producer
from tests.conftest import Transport, collect, eventually, make_config, stored
from tests.test_sources import inputs


async def test_image_audio_and_text_reach_the_engine_with_the_contracts_headers(
    nats_url: str, nc: Any, prefix: str, transport: Transport
) -> None:
    seen = await inputs(nc, prefix, "sdk")
    out = await collect(nc, f"{prefix}.out.sdk")
    engine = Engine(transport.config(prefix))
    await engine.start(nats_url)
    frame = np.zeros((48, 64, 3), np.uint8)
    try:
        async with Producer(nats_url, source="sdk", prefix=prefix) as p:
            ids = [
                await p.image(frame),  # JPEG-encoded by the producer
                await p.image(cv2.imencode(".png", frame)[1].tobytes()),
                await p.audio(np.zeros(1600, np.float32), 16_000),
                await p.audio(np.zeros((800, 2), np.int16), 8_000),
                await p.text("a red ball"),
            ]
        assert p.durable is transport.durable
        await out.wait_events(set(ids))
        await seen.wait_for(5)
        types = [h["Content-Type"] for _, h, _ in seen.items]
        assert types == [
            "image/jpeg",
            "image/png",
            "audio/pcm;rate=16000;channels=1;format=f32le",
            "audio/pcm;rate=8000;channels=2;format=s16le",
            "text/plain;charset=utf-8",
        ]
        headers = [h for _, h, _ in seen.items]
        assert [h["Nats-Msg-Id"] for h in headers] == ids and all(i.startswith("sdk-") for i in ids)
        assert [h["AutoGLM-Seq"] for h in headers] == ["0", "1", "2", "3", "4"]
        assert {h["traceparent"] for h in headers} == {p.traceparent}
    finally:
        await engine.stop()


async def test_mistakes_are_one_clear_error(nats_url: str) -> None:
    with pytest.raises(AutoGLMError, match="source 'a b'"):
        Producer(nats_url, source="a b")
    async with Producer(nats_url, source="x") as p:
        with pytest.raises(AutoGLMError, match="neither JPEG nor PNG"):
            await p.image(b"GIF89a")
        with pytest.raises(AutoGLMError, match=r"\(H, W, 3\) uint8"):
            await p.image(np.zeros((4, 4), np.uint8))


@pytest.fixture
async def small_server(tmp_path: Path) -> AsyncIterator[str]:
    """A JetStream server whose max_payload is 64 KiB, so a modest frame is 'large'."""
    conf = tmp_path / "small.conf"
    conf.write_text("max_payload: 65536\n")
    server = EmbeddedServer(tmp_path / "js", extra_args=["-c", str(conf)])
    url = await asyncio.to_thread(server.start)
    yield url
    await asyncio.to_thread(server.stop)


async def test_a_frame_over_the_servers_max_payload_goes_by_claim_check(small_server: str) -> None:
    prefix = "sdkcc"
    engine = Engine(make_config(prefix))
    await engine.start(small_server)
    frame = np.random.default_rng(0).integers(0, 255, (160, 160, 3), np.uint8)  # 75 KiB raw
    try:
        async with Producer(small_server, source="big", prefix=prefix, quality=None) as p:
            eid = await p.image(frame)
        assert p.claim_checked == 1
        async with Producer(small_server, source="big", prefix=prefix) as p:
            await p.text("small")  # fits: goes as it is
        assert p.claim_checked == 0
        client = await nats.connect(small_server)

        async def image_results() -> list[Any]:
            return [r for _, r in await stored(client, f"{prefix}.out.big") if "image" in r["events"]]

        try:
            [record] = await eventually(image_results, "the frame's result")
        finally:
            await client.close()
        assert record["events"]["image"] == [eid]
        assert record["features"]["image"]["bytes"] == frame.nbytes  # the engine fetched every byte
        assert engine.claims is not None and engine.claims.fetched == 1
    finally:
        await engine.stop()


async def test_durable_back_pressure_bounds_what_is_in_flight_and_loses_nothing(
    nats_url: str, nc: Any, prefix: str
) -> None:
    cfg = make_config(prefix, nats={"durable": True})
    engine = Engine(cfg)
    await engine.start(nats_url)  # makes the streams
    await engine.stop()  # ...and is gone while the producer sends
    peak = 0
    async with Producer(nats_url, source="bp", prefix=prefix, max_in_flight=4) as p:
        ids = []
        for i in range(60):
            ids.append(await p.text(f"line {i}"))
            peak = max(peak, p.in_flight)
    assert p.durable is True and 0 < peak <= 4
    out = await collect(nc, f"{prefix}.out.bp")
    engine = Engine(cfg)
    await engine.start(nats_url)
    try:
        await out.wait_events(set(ids))  # everything the stream stored while no engine ran
    finally:
        await engine.stop()


async def test_events_in_flight_when_the_server_restarts_are_sent_again_and_stored_once(
    tmp_path: Path,
) -> None:
    """The server goes away mid-publish: the events whose PubAck failed or never
    came are sent again under their own ids, so the stream holds every event
    once, and the producer says nothing failed."""
    import socket

    from nats.js.api import StreamConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = EmbeddedServer(tmp_path / "js", port=port)
    url = await asyncio.to_thread(server.start)
    opts = {"max_reconnect_attempts": -1, "reconnect_time_wait": 0.2}
    nc = await nats.connect(url, **opts)
    try:
        await nc.jetstream().add_stream(StreamConfig(name="P_IN", subjects=["p.in.>"]))
        async with Producer(url, source="cam0", prefix="p", ack_timeout=3.0, connect_opts=opts) as p:
            for i in range(600):
                if i == 300:
                    await asyncio.to_thread(server.stop)
                    await asyncio.to_thread(server.start)
                await p.text(f"line {i}")
        assert p.durable and p.in_flight == 0
        info = await eventually(lambda: nc.jetstream().stream_info("P_IN"), "the stream again")
        assert info.state.messages == 600  # every event, once (a resent copy is a duplicate by id)
    finally:
        await nc.close()
        await asyncio.to_thread(server.stop)


async def test_a_producer_started_before_the_engine_turns_durable_when_the_stream_appears(
    nats_url: str, nc: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Core mode is not decided for good by the first event: once a stream
    stores the inputs (the engine came up), the producer finds it and waits
    for PubAcks from then on. ``durable=True`` refuses to send without one."""
    import engine.sources.producer as producer_module
    from engine.contracts.errors import TransportError

    with pytest.raises(TransportError, match="durable=True"):
        async with Producer(nats_url, source="cam0", prefix=prefix, durable=True) as strict:
            await strict.text("nobody stores this")
    monkeypatch.setattr(producer_module, "RECHECK_S", 0.0)
    async with Producer(nats_url, source="cam0", prefix=prefix) as p:
        await p.text("before")
        assert p.durable is False
        engine = Engine(make_config(prefix, nats={"durable": True}))
        await engine.start(nats_url)
        try:
            await p.text("after")
            assert p.durable is True
        finally:
            await engine.stop()
