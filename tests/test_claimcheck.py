"""Claim check: payloads over the server's max_payload go through the Object Store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.js.errors import APIError

from engine.contracts.errors import EventRejected
from engine.runtime.engine import Engine
from engine.runtime.server import EmbeddedServer
from engine.tools.publish import connect, publish_file
from engine.wire.claimcheck import OBJECT_REF, ObjectRef, parse_ref, put_payload
from tests.conftest import collect, make_config, send

_REF = b'{"bucket": "b", "name": "x", "content_type": "image/png", "size": 1'


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
        (_REF + b"}", "bad_object_ref", "no sha256"),
        (_REF + b', "sha256": "' + b"g" * 64 + b'"}', "bad_object_ref", "sha256="),
        (_REF + b', "sha256": "' + b"a" * 63 + b'"}', "bad_object_ref", "sha256="),
        (_REF + b', "sha256": 7}', "bad_object_ref", "sha256="),
    ],
)
def test_bad_references_are_refused_before_any_fetch(body: bytes, reason: str, words: str) -> None:
    with pytest.raises(EventRejected) as err:
        parse_ref(body, max_bytes=50)
    assert err.value.reason == reason and words in err.value.message


def test_a_reference_round_trips() -> None:
    ref = ObjectRef("autoglm-payloads", "abc123", "image/png", 42, "ab" * 32)
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
        gone = ObjectRef("autoglm-payloads", "gone", "image/png", 10, "00" * 32).encode()
        await send(nc, prefix, "cam", "image", gone, ts, content_type=OBJECT_REF, event_id="gone1")
        real = await put_payload(js, "autoglm-payloads", b"x" * 1000, "image/png", max_payload=nc.max_payload)
        liar = ObjectRef(real.bucket, real.name, real.content_type, 999, real.sha256)
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
        ref = ObjectRef("autoglm-payloads", "x", "image/png", 10, "00" * 32).encode()
        await send(nc, prefix, "cam", "image", ref, time.time_ns(), content_type=OBJECT_REF, event_id="r1")
        [record] = await dlq.wait_for(1)
        assert record["reason"] == "object_missing" and "JetStream" in record["message"]
    finally:
        await engine.stop()
        await nc.close()
        await asyncio.to_thread(server.stop)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


async def rewrite_object(js: Any, bucket: str, name: str, data: bytes) -> None:
    """What anyone allowed to put objects can do to one whose name it knows:
    new chunks, then newer metadata for the same name (no rollup needed)."""
    nuid = uuid.uuid4().hex
    await js.publish(f"$O.{bucket}.C.{nuid}", data)
    meta = {"name": name, "bucket": bucket, "nuid": nuid, "size": len(data), "chunks": 1,
            "digest": "SHA-256=" + _b64(hashlib.sha256(data).digest())}  # fmt: skip
    await js.publish(f"$O.{bucket}.M.{_b64(name.encode())}", orjson.dumps(meta))


async def test_an_object_rewritten_after_its_reference_is_refused_as_tampered(
    nc: Any, nats_url: str, prefix: str
) -> None:
    bucket = f"{prefix}-objects"
    js = nc.jetstream()
    await js.create_object_store(bucket)  # nats-py's kind of bucket: it takes rollup headers
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(make_config(prefix, nats={"subject_prefix": prefix, "object_bucket": bucket}))
    await engine.start(nats_url)
    try:
        # the engine closed the bucket to publishes that erase: a rollup, a purge, a delete
        config = (await js.stream_info(f"OBJ_{bucket}")).config
        assert not config.allow_rollup_hdrs and config.deny_purge and config.deny_delete
        keep = await put_payload(js, bucket, b"kept", "text/plain")
        with pytest.raises(APIError, match="rollup not permitted"):
            await js.publish(f"$O.{bucket}.M.{_b64(b'x')}", b"{}", headers={"Nats-Rollup": "all"})
        with pytest.raises(APIError):
            await js.purge_stream(f"OBJ_{bucket}")
        assert (await (await js.object_store(bucket)).get(keep.name)).data == b"kept"

        ts = time.time_ns()
        # newer metadata pointing at other bytes
        rewritten = await put_payload(js, bucket, b"the victim's own words", "text/plain")
        await rewrite_object(js, bucket, rewritten.name, b"an attacker's words instead")
        # the same, keeping the size the reference names
        same_size = await put_payload(js, bucket, b"abc", "text/plain")
        await rewrite_object(js, bucket, same_size.name, b"xyz")
        # a chunk added under unchanged metadata
        grown = await put_payload(js, bucket, b"the victim's other words", "text/plain")
        info = await (await js.object_store(bucket)).get_info(grown.name)
        await js.publish(f"$O.{bucket}.C.{info.nuid}", b" and an attacker's")
        elsewhere = await put_payload(js, "autoglm-payloads", b"words", "text/plain")  # not its bucket
        honest = await put_payload(js, bucket, b"honest words", "text/plain")
        refs = {"t1": rewritten, "t2": grown, "t3": elsewhere, "t4": honest, "t5": same_size}
        for eid, ref in refs.items():
            await send(nc, prefix, "cam", "text", ref.encode(), ts, content_type=OBJECT_REF, event_id=eid)
        records = await dlq.wait_for(4)
        assert {r["event_id"]: r["reason"] for r in records} == {
            "t1": "object_tampered",
            "t2": "object_tampered",
            "t3": "bad_object_ref",
            "t5": "object_tampered",
        }, records
        [result] = await out.wait_for(1)
        assert result["events"] == {"text": ["t4"]}
        assert result["features"]["text"]["bytes"] == len(b"honest words")
    finally:
        await engine.stop()
