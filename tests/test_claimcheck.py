"""Claim check: payloads over the server's max_payload go through the Object Store."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine.app import Engine
from engine.claimcheck import OBJECT_REF, ObjectRef, parse_ref, put_payload
from engine.errors import EventRejected
from engine.publish import connect, publish_file
from engine.server import EmbeddedServer
from tests.conftest import collect, make_config, send


@pytest.mark.parametrize(
    ("body", "reason", "words"),
    [
        (b"not json", "bad_object_ref", "not JSON"),
        (b"[1]", "bad_object_ref", "JSON object"),
        (
            b'{"bucket": "a b", "name": "x", "content_type": "image/png", "size": 1}',
            "bad_object_ref",
            "bucket=",
        ),
        (
            b'{"bucket": "b", "name": "../x", "content_type": "image/png", "size": 1}',
            "bad_object_ref",
            "name=",
        ),
        (b'{"bucket": "b", "name": "x", "size": 1}', "bad_object_ref", "content_type"),
        (b'{"bucket": "b", "name": "x", "content_type": "image/png", "size": -1}', "bad_object_ref", "size="),
        (b'{"bucket": "b", "name": "x", "content_type": "image/png", "size": 99}', "payload_too_large", "99"),
        (b"{" + b" " * 5000 + b"}", "bad_object_ref", "bytes"),
    ],
)
def test_bad_references_are_refused_before_any_fetch(body: bytes, reason: str, words: str) -> None:
    with pytest.raises(EventRejected) as err:
        parse_ref(body, max_bytes=50)
    assert err.value.reason == reason and words in err.value.message


def test_a_reference_round_trips() -> None:
    ref = ObjectRef("autoglm-payloads", "abc123", "image/png", 42)
    assert parse_ref(ref.encode(), max_bytes=100) == ref


@pytest.fixture
async def small_server(tmp_path: Path) -> AsyncIterator[str]:
    """A JetStream server whose max_payload is 64 KiB, so a modest frame is 'large'."""
    conf = tmp_path / "small.conf"
    conf.write_text("max_payload: 65536\n")
    server = EmbeddedServer(tmp_path / "js", extra_args=["-c", str(conf)])
    url = await asyncio.to_thread(server.start)
    yield url
    await asyncio.to_thread(server.stop)


async def test_publish_over_max_payload_goes_by_claim_check_and_the_engine_fetches_it(
    small_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = "cc"
    nc = await connect(small_server)
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(make_config(prefix, aligner={"idle_timeout_ms": 200}))
    await engine.start(small_server)
    try:
        assert nc.max_payload == 65536
        big = tmp_path / "big.png"
        big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300_000))  # 300 KB: over the server's limit
        await publish_file(small_server, "cam", image=big, prefix=prefix, event_id="big1", wait=5.0)
        printed = capsys.readouterr().out
        assert "(claim check)" in printed and '"big1"' in printed  # the result came back to the publisher
        [record] = await out.wait_for(1)
        assert record["events"] == {"image": ["big1"]}
        assert record["features"]["image"]["bytes"] == big.stat().st_size  # the engine got every byte
        assert engine.claims is not None and engine.claims.fetched == 1

        # a reference to nothing, and one whose size lies: each refused with its reason
        js = nc.jetstream()
        ts = time.time_ns()
        gone = ObjectRef("autoglm-payloads", "gone", "image/png", 10).encode()
        await send(nc, prefix, "cam", "image", gone, ts, content_type=OBJECT_REF, event_id="gone1")
        real = await put_payload(js, "autoglm-payloads", b"x" * 1000, "image/png", max_payload=nc.max_payload)
        liar = ObjectRef(real.bucket, real.name, real.content_type, 999)
        await send(nc, prefix, "cam", "image", liar.encode(), ts, content_type=OBJECT_REF, event_id="liar1")
        records = await dlq.wait_for(2)
        reasons = {r["event_id"]: r["reason"] for r in records}
        assert reasons == {"gone1": "object_missing", "liar1": "bad_object_ref"}
        assert "gone" in records[0]["message"] or "gone" in records[1]["message"]
    finally:
        await engine.stop()
        await nc.close()


async def test_without_jetstream_a_reference_is_refused_clearly(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "plain", jetstream=False)
    url = await asyncio.to_thread(server.start)
    prefix = "nojs"
    nc: Any = await connect(url)
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(make_config(prefix))
    await engine.start(url)
    try:
        ref = ObjectRef("autoglm-payloads", "x", "image/png", 10).encode()
        await send(nc, prefix, "cam", "image", ref, time.time_ns(), content_type=OBJECT_REF, event_id="r1")
        [record] = await dlq.wait_for(1)
        assert record["reason"] == "object_missing" and "JetStream" in record["message"]
    finally:
        await engine.stop()
        await nc.close()
        await asyncio.to_thread(server.stop)
