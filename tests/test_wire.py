"""The wire contract end to end, over a real nats-server: hostile headers, NATS's own limits."""

from __future__ import annotations

import time
from typing import Any

import pytest
from nats.js.errors import APIError

from engine.runtime.engine import Engine
from engine.wire.codec import encode_headers
from tests.conftest import Transport, collect, make_config

#: 17 headers of 4,000 characters: each under the 4 KiB value limit, 68 KiB in all.
PADDING = {f"X-Pad-{i:02}": "a" * 4000 for i in range(17)}


async def test_core_mode_refuses_a_header_block_over_64_kib_with_a_dlq_record(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """JetStream cannot store such a message; core mode took it. Now both
    modes refuse it, core mode with a DLQ record."""
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(make_config(prefix, nats={"durable": False}))
    await engine.start(nats_url)
    try:
        hdrs = {**encode_headers(time.time_ns(), "text/plain", event_id="big"), **PADDING}
        await nc.publish(f"{prefix}.in.cam.text", b"hello", headers=hdrs)
        [record] = await dlq.wait_for(1)
    finally:
        await engine.stop()
    assert record["reason"] == "header_too_large" and record["event_id"] == "big"
    assert "header block" in record["message"]


async def test_durable_mode_the_server_refuses_a_header_block_over_64_kib(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """What the README says and the engine cannot change: JetStream refuses
    the message before the engine can see it. A JetStream publisher is told
    (error 10097); a plain publisher is not, and no DLQ record is made."""
    engine = Engine(make_config(prefix, nats={"durable": True}))
    await engine.start(nats_url)
    try:
        js = nc.jetstream()
        subject = f"{prefix}.in.cam.text"
        big = {**encode_headers(time.time_ns(), "text/plain", event_id="big"), **PADDING}
        with pytest.raises(APIError) as info:
            await js.publish(subject, b"hello", headers=big)
        assert info.value.err_code == 10097  # "header size exceeds maximum allowed of 64k"
        await nc.publish(subject, b"hello", headers=big)  # plain: nobody answers
        small = encode_headers(time.time_ns(), "text/plain", event_id="ok")
        ack = await js.publish(subject, b"hello", headers=small)  # after it on the same connection
        assert ack.seq == 1  # only this one was stored
    finally:
        await engine.stop()


async def test_intake_survives_unicode_digits_and_reads_any_case(
    nc: Any, nats_url: str, prefix: str, transport: Transport
) -> None:
    """Issue 12, item 1: a timestamp of ``179596339822592701²`` made int()
    raise ValueError in the codec, which killed the durable fetch loop: the
    event was redelivered after a restart and wedged it again. Now every such
    number is a DLQ record and the events after it are processed, in either
    transport; a producer that spells the header names in lower case is understood."""
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(transport.config(prefix))
    await engine.start(nats_url)
    try:
        now = time.time_ns()
        subject = f"{prefix}.in.cam.{{}}"
        hostile = [
            ("text", {"AutoGLM-Timestamp": f"{now}²", "Content-Type": "text/plain", "Nats-Msg-Id": "ts"}),
            ("text", {**encode_headers(now, "text/plain", event_id="seq"), "AutoGLM-Seq": "7①"}),
            ("image", encode_headers(now, "image/x-raw;width=٤;height=1", event_id="width")),
            ("audio", encode_headers(now, "audio/pcm;rate=16000;channels=１;format=s16le", event_id="ch")),
        ]
        for modality, hdrs in hostile:
            await nc.publish(subject.format(modality), b"\x00\x00\x00", headers=hdrs)
        lower = {"autoglm-timestamp": str(now + 1), "content-type": "text/plain", "nats-msg-id": "lower"}
        await nc.publish(subject.format("text"), b"after", headers=lower)
        await nc.publish(
            subject.format("text"), b"after", headers=encode_headers(now + 2, "text/plain", event_id="ok")
        )
        records = await dlq.wait_for(len(hostile))
        await out.wait_events({"lower", "ok"})
    finally:
        await engine.stop()
    assert sorted(r["reason"] for r in records) == ["bad_header", "bad_header", "bad_header", "bad_timestamp"]
    assert sorted(out.event_ids()) == ["lower", "ok"]
