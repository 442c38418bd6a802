from __future__ import annotations

import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.contracts.errors import REASONS, EventRejected
from engine.contracts.subjects import Subjects
from engine.contracts.types import InputEvent
from engine.wire.codec import (
    MAX_TIMESTAMP_NS,
    MIN_TIMESTAMP_NS,
    Limits,
    decode_event,
    encode_headers,
    header,
    parse_content_type,
)

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
    assert Subjects("autoglm").dlq(None) == "autoglm.dlq._"


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


@pytest.mark.parametrize("spell", [str.lower, str.upper, str.swapcase])
def test_header_names_match_regardless_of_case(spell: object) -> None:
    """NATS header names are case-insensitive like HTTP's: a lower-case
    ``content-type`` was reported missing."""
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    canonical = encode_headers(TS, "image/png", event_id="e-1", seq=7, traceparent=tp)
    hdrs = {spell(k): v for k, v in canonical.items()}  # type: ignore[operator]
    ev = decode(headers={**hdrs, "X-Other": "1"})
    assert (ev.ts_ns, ev.content_type.mime, ev.event_id, ev.seq, ev.traceparent) == (
        TS,
        "image/png",
        "e-1",
        7,
        tp,
    )
    assert header(hdrs, "Nats-Msg-Id") == "e-1" and header(hdrs, "nats-msg-ID") == "e-1"
    assert header(hdrs, "X-Missing") is None and header(None, "Content-Type") is None


def test_a_header_given_twice_with_different_values_is_refused() -> None:
    same = {**encode_headers(TS, "image/png"), "content-type": "image/png"}
    assert decode(headers=same).content_type.mime == "image/png"
    clash = {**encode_headers(TS, "image/png"), "CONTENT-TYPE": "text/plain"}
    with pytest.raises(EventRejected, match=r"Content-Type.*given twice") as info:
        decode(headers=clash)
    assert info.value.reason == "bad_header"


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # all-zero parent id
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff
        " FF-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01 ",
    ],
)
def test_a_traceparent_invalid_by_w3c_rules_is_ignored_not_carried(traceparent: str) -> None:
    """W3C trace context: such a value must be ignored (a new trace starts);
    it was carried into the result as if it named a trace."""
    ev = decode(headers=encode_headers(TS, "image/jpeg", traceparent=traceparent))
    assert ev.traceparent is None


def test_a_header_block_over_64_kib_is_refused_as_jetstream_would() -> None:
    """JetStream refuses a header block over 64 KiB (error 10097); core mode
    accepted it from many headers under 4 KiB each. Counted as UTF-8 bytes."""
    base = encode_headers(TS, "image/jpeg")
    fits = {**base, **{f"X-Pad-{i:02}": "a" * 4000 for i in range(16)}}
    assert decode(headers=fits).ts_ns == TS
    over = {**base, **{f"X-Pad-{i:02}": "a" * 4000 for i in range(17)}}
    with pytest.raises(EventRejected, match=r"header block is 68\d{3} bytes in 19 headers") as info:
        decode(headers=over)
    assert info.value.reason == "header_too_large"
    wide = {**base, **{f"X-Pad-{i:02}": "é" * 3000 for i in range(11)}}  # 33,000 characters, 66,000 bytes
    assert reason_of(headers=wide) == "header_too_large"
    assert reason_of(headers={**base, "X-" + "n" * 70_000: "1"}) == "header_too_large"  # a long name
    assert reason_of(headers={**base, "X-Big": "a" * 4097}) == "header_too_large"


def test_payload_rules() -> None:
    assert reason_of(body=b"") == "empty_payload"
    assert reason_of(body=b"x" * 11, limits=Limits(max_payload_bytes=10)) == "payload_too_large"
    assert decode(body=b"x" * 10, limits=Limits(max_payload_bytes=10)).payload == b"x" * 10


def test_parse_helpers() -> None:
    ct = parse_content_type(' Audio/PCM ; Rate=16000 ;channels="2"; format=s16le')
    assert ct.mime == "audio/pcm"
    assert dict(ct.params) == {"rate": "16000", "channels": "2", "format": "s16le"}
    assert Subjects("edge.site1").parse_input("edge.site1.in.cam.text").source == "cam"


def test_unknown_reason_code_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown DLQ reason"):
        EventRejected("made_up", "x")


# Digits that str.isdigit() (and int(), for some) accept but the wire contract does not.
UNICODE_DIGITS = ["²", "①", "１", "٣", "۵", "߃", "४", "𝟗", "⁹", "₇", "Ⅻ", "〇"]


@pytest.mark.parametrize("digit", UNICODE_DIGITS)
def test_numbers_are_ascii_digits_only(digit: str) -> None:
    """``str.isdigit()`` let ``179596339822592701²`` through to ``int()``, whose
    ``ValueError`` was no ``EventRejected`` and killed the intake loop."""
    ts = str(TS)
    for bad in (ts[:-1] + digit, ts + digit, digit, ts.replace("7", digit)):
        assert reason_of(headers=encode_headers(1, "image/jpeg") | {"AutoGLM-Timestamp": bad}) == (
            "bad_timestamp"
        )
        assert reason_of(headers={**encode_headers(TS, "image/jpeg"), "AutoGLM-Seq": "12" + digit}) == (
            "bad_header"
        )
    raw = "image/x-raw;format=bgr8;width={};height={}"
    assert reason_of(headers=encode_headers(TS, raw.format("4" + digit, 2))) == "bad_header"
    assert reason_of(headers=encode_headers(TS, raw.format(4, digit))) == "bad_header"
    pcm = "audio/pcm;rate={};channels={};format=f32le"
    audio = "autoglm.in.mic.audio"
    assert reason_of(subject=audio, headers=encode_headers(TS, pcm.format("1600" + digit, 1))) == "bad_header"
    assert reason_of(subject=audio, headers=encode_headers(TS, pcm.format(16000, digit))) == "bad_header"


def test_numbers_at_their_limits() -> None:
    top = str(2**63 - 1)
    assert decode(headers={**encode_headers(TS, "image/jpeg"), "AutoGLM-Seq": top}).seq == 2**63 - 1
    assert decode(headers={**encode_headers(TS, "image/jpeg"), "AutoGLM-Seq": " 0 "}).seq == 0
    for bad in (str(2**63), "9" * 19, "9" * 4000, "+1", "1_000", " ", "0x10"):
        assert reason_of(headers={**encode_headers(TS, "image/jpeg"), "AutoGLM-Seq": bad}) == "bad_header"
    assert decode(headers=encode_headers(2**63 - 1, "image/jpeg")).ts_ns == 2**63 - 1
    for bad in (str(2**63), "9" * 19, "1" * 4000, "1_764_000_000_000_000_000", "+1764000000000000000"):
        assert reason_of(headers={"AutoGLM-Timestamp": bad, "Content-Type": "image/jpeg"}) == "bad_timestamp"


# -- property: any str headers and bytes body end as an event or a refusal ----------

#: Every character ``str.isdigit()`` accepts: ASCII, ``²``, ``①``, fullwidth, Arabic-Indic...
_ISDIGIT = [c for c in map(chr, range(sys.maxunicode + 1)) if c.isdigit()]
_NUMERALS = st.one_of(st.sampled_from(_ISDIGIT), st.characters(categories=["Nd", "No", "Nl"]))


@st.composite
def _numbers(draw: st.DrawFn) -> str:
    """Mostly almost-valid numbers: ASCII digits with other digits, signs,
    spaces or separators mixed in."""
    digits = draw(st.text(alphabet=st.one_of(st.sampled_from("0123456789"), _NUMERALS), max_size=25))
    if draw(st.booleans()):
        i = draw(st.integers(0, 19))
        digits = str(TS)[:i] + digits + str(TS)[i + len(digits) :]  # e.g. 179596339822592701²
    if draw(st.booleans()):
        return digits
    pad = draw(st.sampled_from([" ", "+", "-", "_", "\t", "\u3000", "\u00a0", "e3", ".0", "\x1c"]))
    i = draw(st.integers(0, len(digits)))
    return digits[:i] + pad + digits[i:]


_SAMPLES = [
    str(TS),
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-" + "0" * 32 + "-" + "0" * 16 + "-00",
]


@st.composite
def _value(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 19))
    if kind < 8:
        return draw(st.text())  # any Unicode but surrogates (header values arrive as UTF-8)
    if kind < 14:
        return draw(_numbers())
    if kind < 19:
        return draw(st.sampled_from(_SAMPLES))
    return draw(st.characters()) * draw(st.integers(3000, 70_000))  # huge


_values = _value()


@st.composite
def _content_types(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(_values)
    if kind == 1:
        return f"image/x-raw;format=bgr8;width={draw(_values)};height={draw(_numbers())}"
    if kind == 2:
        return f"audio/pcm;rate={draw(_numbers())};channels={draw(_values)};format=f32le"
    return draw(st.sampled_from(["image/jpeg", "audio/wav", "text/plain", "image/png;;=", ";", "=;="]))


_NAMES = ["AutoGLM-Timestamp", "Content-Type", "Nats-Msg-Id", "AutoGLM-Seq", "traceparent"]


@st.composite
def _headers(draw: st.DrawFn) -> dict[str, str]:
    hdrs: dict[str, str] = {}
    for name in _NAMES:
        if draw(st.integers(0, 5)) == 0:
            continue
        spelling = draw(st.sampled_from([name, name, name, name.lower(), name.upper(), name.swapcase()]))
        if name == "Content-Type":
            hdrs[spelling] = draw(_content_types())
        elif name in ("AutoGLM-Timestamp", "AutoGLM-Seq"):
            # half valid, so that the checks after this one are reached too
            kind = draw(st.integers(0, 5))
            hdrs[spelling] = str(TS) if kind > 2 else draw(_numbers() if kind else _values)
        else:
            hdrs[spelling] = draw(_values)
        if draw(st.integers(0, 9)) == 0:  # the same header twice, spelled two ways
            hdrs[name.lower() if spelling != name.lower() else name] = draw(_values)
    for _ in range(draw(st.integers(0, 2))):
        hdrs[draw(st.text(min_size=1, max_size=20))] = draw(_values)
    return hdrs


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=st.one_of(
        st.sampled_from(["autoglm.in.cam.image", "autoglm.in.mic.audio", "autoglm.in.t.text"]),
        st.text(max_size=80),
    ),
    hdrs=st.one_of(st.none(), _headers()),
    body=st.binary(max_size=64),
    default_id=st.one_of(st.none(), st.text(max_size=300)),
)
def test_decode_event_returns_an_event_or_raises_event_rejected(
    subject: str, hdrs: dict[str, str] | None, body: bytes, default_id: str | None
) -> None:
    """Whatever the header values (Unicode digits, huge strings, odd spellings
    of the names), decode_event answers with an event or a DLQ reason: any
    other exception would stop the engine's intake loop."""
    try:
        event = decode_event(subject, hdrs, body, default_id=default_id)
    except EventRejected as exc:
        assert exc.reason in REASONS and exc.message
        return
    assert isinstance(event, InputEvent)
    assert MIN_TIMESTAMP_NS <= event.ts_ns <= MAX_TIMESTAMP_NS
    assert event.seq is None or 0 <= event.seq < 2**63
    assert event.traceparent is None or len(event.traceparent) == 55
