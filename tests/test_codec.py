from __future__ import annotations

import pytest

from engine.codec import (
    Limits,
    decode_event,
    dlq_subject,
    encode_headers,
    parse_content_type,
    parse_subject,
)
from engine.errors import REASONS, EventRejected

TS = 1_764_000_000_000_000_000


def decode(
    subject: str = "autoglm.in.cam1.image", headers: dict[str, str] | None = None, body: bytes = b"x", **kw
):  # type: ignore[no-untyped-def]
    if headers is None:
        headers = encode_headers(TS, "image/jpeg")
    return decode_event(subject, headers, body, **kw)


def reason_of(**kw: object) -> str:
    with pytest.raises(EventRejected) as info:
        decode(**kw)  # type: ignore[arg-type]
    assert info.value.reason in REASONS
    assert info.value.message  # a human sentence, never empty
    return info.value.reason


@pytest.mark.parametrize(
    ("modality", "ct"),
    [
        ("image", "image/jpeg"),
        ("image", "image/png"),
        ("image", "image/jpg"),
        ("image", "image/x-raw;format=bgr8;width=4;height=2"),
        ("audio", "audio/wav"),
        ("audio", "audio/x-wav"),
        ("audio", "audio/pcm;rate=16000;channels=1;format=s16le"),
        ("audio", "audio/pcm; rate=44100; channels=2; format=f32le"),
        ("text", "text/plain;charset=utf-8"),
        ("text", "text/plain"),
    ],
)
def test_every_supported_content_type_decodes(modality: str, ct: str) -> None:
    ev = decode(subject=f"autoglm.in.cam-1_A.{modality}", headers=encode_headers(TS, ct), body=b"abc")
    assert ev.source == "cam-1_A"
    assert ev.modality == modality
    assert ev.ts_ns == TS
    assert ev.payload == b"abc"


def test_optional_headers_are_carried() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ev = decode(headers=encode_headers(TS, "image/png", event_id="e-1", seq=7, traceparent=tp))
    assert (ev.event_id, ev.generated_id, ev.seq, ev.traceparent) == ("e-1", False, 7, tp)


def test_event_id_is_generated_when_absent_and_unique() -> None:
    a, b = decode(), decode()
    assert a.generated_id and b.generated_id
    assert a.event_id != b.event_id


@pytest.mark.parametrize(
    "subject",
    [
        "autoglm.in.cam1",  # no modality
        "autoglm.in.cam1.video",  # unknown modality
        "autoglm.in.cam1.image.extra",
        "autoglm.in." + "x" * 65 + ".image",  # source too long
        "autoglm.in.ca$m.image",
        "other.in.cam1.image",
    ],
)
def test_malformed_subjects_are_bad_subject(subject: str) -> None:
    assert reason_of(subject=subject) == "bad_subject"
    assert dlq_subject("autoglm", None) == "autoglm.dlq._"


def test_timestamp_rules() -> None:
    assert reason_of(headers={"Content-Type": "image/jpeg"}) == "missing_timestamp"
    with pytest.raises(EventRejected) as info:
        decode_event("autoglm.in.c.image", None, b"x")
    assert info.value.reason == "missing_timestamp"
    for bad in ("abc", "-5", "1.5e18", ""):
        assert reason_of(headers={"AutoGLM-Timestamp": bad, "Content-Type": "image/jpeg"}) == "bad_timestamp"
    with pytest.raises(EventRejected, match="seconds or milliseconds"):
        decode(headers=encode_headers(1_764_000_000, "image/jpeg"))  # seconds, not ns
    assert reason_of(headers=encode_headers(2**64, "image/jpeg")) == "bad_timestamp"


def test_content_type_rules() -> None:
    assert reason_of(headers={"AutoGLM-Timestamp": str(TS)}) == "missing_content_type"
    assert reason_of(headers=encode_headers(TS, "video/mp4")) == "unsupported_content_type"
    assert reason_of(headers=encode_headers(TS, "audio/wav")) == "modality_mismatch"
    assert reason_of(headers=encode_headers(TS, "image/x-raw;format=rgb8;width=2;height=2")) == (
        "unsupported_content_type"
    )
    assert reason_of(headers=encode_headers(TS, "image/x-raw;format=bgr8;height=2")) == "bad_header"
    assert reason_of(headers=encode_headers(TS, "image/x-raw;width=0;height=2")) == "bad_header"
    audio = "autoglm.in.mic.audio"
    assert reason_of(subject=audio, headers=encode_headers(TS, "audio/pcm;rate=16000;channels=1")) == (
        "unsupported_content_type"
    )
    assert reason_of(
        subject=audio, headers=encode_headers(TS, "audio/pcm;rate=x;channels=1;format=s16le")
    ) == ("bad_header")
    text = "autoglm.in.t.text"
    assert reason_of(subject=text, headers=encode_headers(TS, "text/plain;charset=latin-1")) == (
        "unsupported_content_type"
    )
    assert reason_of(headers=encode_headers(TS, "image/jpeg;oops")) == "bad_header"


def test_header_rules() -> None:
    assert reason_of(headers={**encode_headers(TS, "image/jpeg"), "AutoGLM-Seq": "x"}) == "bad_header"
    assert reason_of(headers={**encode_headers(TS, "image/jpeg"), "traceparent": "nope"}) == "bad_header"
    assert reason_of(headers={**encode_headers(TS, "image/jpeg"), "X-Big": "a" * 5000}) == "header_too_large"
    assert reason_of(headers=encode_headers(TS, "image/jpeg", event_id="i" * 300)) == "bad_header"


def test_payload_rules() -> None:
    assert reason_of(body=b"") == "empty_payload"
    assert reason_of(body=b"x" * 11, limits=Limits(max_payload_bytes=10)) == "payload_too_large"
    assert decode(body=b"x" * 10, limits=Limits(max_payload_bytes=10)).payload == b"x" * 10


def test_parse_helpers() -> None:
    ct = parse_content_type(' Audio/PCM ; Rate=16000 ;channels="2"; format=s16le')
    assert ct.mime == "audio/pcm"
    assert dict(ct.params) == {"rate": "16000", "channels": "2", "format": "s16le"}
    assert parse_subject("edge.site1.in.cam.text", "edge.site1").source == "cam"


def test_unknown_reason_code_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown DLQ reason"):
        EventRejected("made_up", "x")
