"""The wire contract: NATS subject + headers + raw body <-> :class:`InputEvent`.

Input subject ``<prefix>.in.<source>.<modality>`` (parsed by
:class:`engine.contracts.subjects.Subjects`); headers
``AutoGLM-Timestamp`` (integer ns, required), ``Content-Type`` (required),
``Nats-Msg-Id``, ``AutoGLM-Seq`` and ``traceparent`` (optional). The body is
the raw payload. Everything here is plain string checks rather than a pydantic
model per event: this runs once per message on the ingest hot path.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, cast

from engine.contracts.errors import EventRejected
from engine.contracts.subjects import InputSubject, Subjects
from engine.contracts.types import MODALITIES, ContentType, InputEvent, Modality, Nanos

TIMESTAMP_HEADER: Final = "AutoGLM-Timestamp"
SEQ_HEADER: Final = "AutoGLM-Seq"
ID_HEADER: Final = "Nats-Msg-Id"
CONTENT_TYPE_HEADER: Final = "Content-Type"
TRACE_HEADER: Final = "traceparent"
#: The headers we read, by their canonical names; names match regardless of
#: case (a fast exact lookup first, a case-folded one when that misses).
_OURS: Final = (TIMESTAMP_HEADER, CONTENT_TYPE_HEADER, ID_HEADER, SEQ_HEADER, TRACE_HEADER)
_EXACT: Final = {n: i for i, n in enumerate(_OURS)}
_FOLDED: Final = {n.lower(): i for i, n in enumerate(_OURS)}

_TRACEPARENT_RE: Final = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE_ID: Final = "0" * 32
_ZERO_SPAN_ID: Final = "0" * 16
#: Timestamps before 2000-01-01 are almost always seconds or milliseconds sent
#: by mistake; refusing them keeps one confused producer from wrecking windows.
MIN_TIMESTAMP_NS: Final = 946_684_800 * 1_000_000_000
MAX_TIMESTAMP_NS: Final = 2**63 - 1
MAX_SEQ: Final = 2**63 - 1
MAX_HEADER_VALUE: Final = 4096
MAX_ID_LENGTH: Final = 256
#: The largest header block NATS stores: JetStream refuses a bigger one
#: (error 10097, "header size exceeds maximum allowed of 64k").
MAX_HEADER_BLOCK: Final = 65_535

#: Accepted MIME types per modality, and aliases mapped onto them.
MIME_TYPES: Final[dict[Modality, frozenset[str]]] = {
    "image": frozenset({"image/jpeg", "image/png", "image/x-raw"}),
    "audio": frozenset({"audio/wav", "audio/pcm"}),
    "text": frozenset({"text/plain"}),
}
_ALIASES: Final = {"audio/x-wav": "audio/wav", "audio/wave": "audio/wav", "image/jpg": "image/jpeg"}
_MIME_MODALITY: Final = {m: mod for mod, ms in MIME_TYPES.items() for m in ms}
PCM_FORMATS: Final = frozenset({"s16le", "f32le"})


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits checked before any expensive work."""

    max_payload_bytes: int = 8 * 1024 * 1024


def parse_content_type(value: str) -> ContentType:
    """Parse ``type/subtype;k=v;...`` (case-insensitive type, trimmed params)."""
    mime, *rest = value.split(";")
    params: dict[str, str] = {}
    for item in rest:
        item = item.strip()
        if not item:
            continue
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise EventRejected("bad_header", f"Content-Type parameter {item!r} is not key=value")
        params[key.strip().lower()] = val.strip().strip('"')
    mime = mime.strip().lower()
    return ContentType(_ALIASES.get(mime, mime), params)


def _ascii_uint(raw: str) -> int | None:
    """The value of 1 to 19 ASCII digits, else ``None``.

    Numbers on the wire are ASCII digits only: ``str.isdigit()`` alone is also
    true for ``²``, ``①``, fullwidth and Arabic-Indic digits, which ``int()``
    then refuses with a ``ValueError`` no caller expects (or, for some,
    accepts). 19 digits hold every value up to ``2**63 - 1`` and keep
    ``int()`` away from long strings. (``isascii`` is O(1) in CPython: this
    is cheaper than a regular expression on the hot path.)
    """
    return int(raw) if raw.isascii() and len(raw) <= 19 and raw.isdigit() else None


def _positive_int(ct: ContentType, key: str, upper: int) -> int:
    raw = ct.params.get(key)
    if raw is None:
        raise EventRejected("bad_header", f"Content-Type {ct.mime} needs the parameter {key}=")
    value = _ascii_uint(raw)
    if value is None or not 0 < value <= upper:
        raise EventRejected(
            "bad_header",
            f"Content-Type parameter {key}={raw[:40]!r} must be an integer in 1..{upper} (ASCII digits)",
        )
    return value


def check_content_type(ct: ContentType, modality: Modality) -> None:
    """Refuse a content type that does not fit the subject's modality."""
    owner = _MIME_MODALITY.get(ct.mime)
    if owner is None:
        raise EventRejected(
            "unsupported_content_type",
            f"Content-Type {ct.mime!r} is not supported; {modality} accepts "
            + ", ".join(sorted(MIME_TYPES[modality])),
        )
    if owner != modality:
        raise EventRejected(
            "modality_mismatch",
            f"Content-Type {ct.mime!r} is {owner} but the subject says {modality}",
        )
    if ct.mime == "image/x-raw":
        fmt = ct.params.get("format", "bgr8").lower()
        if fmt != "bgr8":
            raise EventRejected("unsupported_content_type", f"raw image format {fmt!r}: only bgr8")
        _positive_int(ct, "width", 16384)
        _positive_int(ct, "height", 16384)
    elif ct.mime == "audio/pcm":
        _positive_int(ct, "rate", 768_000)
        _positive_int(ct, "channels", 64)
        fmt = ct.params.get("format", "")
        if fmt.lower() not in PCM_FORMATS:
            raise EventRejected(
                "unsupported_content_type",
                f"PCM format {fmt!r} is not supported: use format=s16le or format=f32le",
            )
    elif ct.mime == "text/plain":
        charset = ct.params.get("charset", "utf-8").lower()
        if charset not in ("utf-8", "utf8"):
            raise EventRejected("unsupported_content_type", f"text charset {charset!r}: only utf-8")


def parse_timestamp(raw: str | None) -> Nanos:
    if raw is None:
        raise EventRejected("missing_timestamp", f"header {TIMESTAMP_HEADER} is missing")
    raw = raw.strip()
    ts = _ascii_uint(raw)
    if ts is None:
        if raw.isascii() and raw.isdigit():
            raise EventRejected("bad_timestamp", f"header {TIMESTAMP_HEADER}={raw[:40]!r} is out of range")
        raise EventRejected(
            "bad_timestamp",
            f"header {TIMESTAMP_HEADER}={raw[:40]!r} is not an integer number of nanoseconds (ASCII digits)",
        )
    ts = int(raw)
    if ts < MIN_TIMESTAMP_NS:
        raise EventRejected(
            "bad_timestamp",
            f"header {TIMESTAMP_HEADER}={ts} is before the year 2000: "
            "send nanoseconds since the Unix epoch, not seconds or milliseconds",
        )
    if ts > MAX_TIMESTAMP_NS:
        raise EventRejected("bad_timestamp", f"header {TIMESTAMP_HEADER}={ts} is out of range")
    return ts


def _check_header_block(hdrs: Mapping[str, str]) -> None:
    """Refuse a header block that NATS could not store: JetStream refuses one
    over 64 KiB (error 10097), so core mode refuses it too and both modes
    accept the same events."""
    size = 12 + sum(  # b"NATS/1.0\r\n" ... b"\r\n", and b"name: value\r\n" per header
        len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass")) + 4
        for k, v in hdrs.items()
    )
    if size > MAX_HEADER_BLOCK:
        raise EventRejected(
            "header_too_large",
            f"the header block is {size} bytes in {len(hdrs)} headers (limit {MAX_HEADER_BLOCK})",
        )


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """``headers[name]``, the name matched regardless of (ASCII) case, as NATS
    header names are (HTTP's rule); the exact spelling wins when both are there."""
    if not headers:
        return None
    value = headers.get(name)
    if value is None:
        folded = name.lower()
        for key, v in headers.items():
            if key.isascii() and key.lower() == folded:
                return v
    return value


def _ours_any_case(hdrs: Mapping[str, str]) -> list[str | None]:
    """The values of :data:`_OURS`, whatever the case of their names. The same
    header twice with different values (``Content-Type`` and ``content-type``)
    is ambiguous, and refused rather than guessed."""
    found: list[str | None] = [None] * len(_OURS)
    spelled = [""] * len(_OURS)
    for name, value in hdrs.items():
        i = _EXACT.get(name)
        if i is None and name.isascii():
            i = _FOLDED.get(name.lower())
        if i is None:
            continue
        if found[i] is not None and found[i] != value:
            raise EventRejected(
                "bad_header",
                f"header {_OURS[i]} is given twice with different values, as {spelled[i]!r} and {name!r}",
            )
        found[i], spelled[i] = value, name
    return found


#: Producers send the same few subjects and Content-Types over and over:
#: their parsed, checked forms are kept (successes only, values up to
#: ``_CACHED_LENGTH`` characters). A cache that fills up is emptied, which
#: keeps it bounded, cheap, and safe from any thread.
_CACHE_SIZE: Final = 16_384
_CACHED_LENGTH: Final = 256
_subjects: dict[str, tuple[str, InputSubject]] = {}
_content_types: dict[Modality, dict[str, ContentType]] = {m: {} for m in MODALITIES}


def _subject(subject: str, prefix: str) -> InputSubject:
    hit = _subjects.get(subject)
    if hit is not None and hit[0] == prefix:
        return hit[1]
    where = Subjects(prefix).parse_input(subject)
    if len(subject) <= _CACHED_LENGTH:
        if len(_subjects) >= _CACHE_SIZE:
            _subjects.clear()
        _subjects[subject] = (prefix, where)
    return where


def _content_type(raw: str, modality: Modality) -> ContentType:
    cache = _content_types[modality]
    ct = cache.get(raw)
    if ct is None:
        ct = parse_content_type(raw)
        check_content_type(ct, modality)
        if len(raw) <= _CACHED_LENGTH:
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            ct = cache[raw] = ContentType(ct.mime, MappingProxyType(dict(ct.params)))  # shared: read-only
    return ct


_counter = itertools.count()


def decode_event(
    subject: str,
    headers: Mapping[str, str] | None,
    payload: bytes,
    *,
    prefix: str = "autoglm",
    limits: Limits = Limits(),
    received_ns: Nanos = 0,
    default_id: str | None = None,
) -> InputEvent:
    """Validate one NATS message and return its :class:`InputEvent`.

    Raises :class:`EventRejected` naming what was wrong; the caller publishes
    the DLQ record. Checks run cheapest first, before the payload is touched.
    """
    where = _subject(subject, prefix)
    hdrs = headers or {}
    chars = 0
    for name, value in hdrs.items():
        size = len(value)
        if size > MAX_HEADER_VALUE:
            raise EventRejected(
                "header_too_large", f"header {name} is {size} characters (limit {MAX_HEADER_VALUE})"
            )
        chars += size + len(name)
    if 4 * (chars + len(hdrs)) + 12 > MAX_HEADER_BLOCK:  # UTF-8 takes at most 4 bytes a character
        _check_header_block(hdrs)
    get = hdrs.get
    raw_ts, raw_ct, raw_id = get(TIMESTAMP_HEADER), get(CONTENT_TYPE_HEADER), get(ID_HEADER)
    raw_seq, trace = get(SEQ_HEADER), get(TRACE_HEADER)
    found = (raw_ts is not None) + (raw_ct is not None) + (raw_id is not None)
    if len(hdrs) > found + (raw_seq is not None) + (trace is not None):
        # Some name is not one of ours spelled the canonical way: look again, ignoring case.
        raw_ts, raw_ct, raw_id, raw_seq, trace = _ours_any_case(hdrs)
    ts = parse_timestamp(raw_ts)
    if raw_ct is None or not raw_ct.strip():
        raise EventRejected("missing_content_type", f"header {CONTENT_TYPE_HEADER} is missing")
    ct = _content_type(raw_ct, where.modality)
    if not payload:
        raise EventRejected("empty_payload", "the message body is empty")
    if len(payload) > limits.max_payload_bytes:
        raise EventRejected(
            "payload_too_large",
            f"payload is {len(payload)} bytes, over the limit of {limits.max_payload_bytes}",
        )
    seq: int | None = None
    if raw_seq is not None:
        seq = _ascii_uint(raw_seq.strip())
        if seq is None or seq > MAX_SEQ:
            raise EventRejected(
                "bad_header",
                f"header {SEQ_HEADER}={raw_seq[:40]!r} is not an integer in 0..{MAX_SEQ} (ASCII digits)",
            )
    if trace is not None:
        raw_trace, trace = trace, trace.strip().lower()
        if not _TRACEPARENT_RE.fullmatch(trace):
            raise EventRejected(
                "bad_header", f"header {TRACE_HEADER}={raw_trace[:80]!r} is not W3C trace context"
            )
        if trace.startswith("ff") or trace[3:35] == _ZERO_TRACE_ID or trace[36:52] == _ZERO_SPAN_ID:
            trace = None  # invalid by W3C rules, which say: ignore it, as if absent (start a new trace)
    event_id = raw_id
    generated = event_id is None or not event_id.strip()
    if generated and default_id is not None:
        # A stable id the transport gave (JetStream's stream sequence): the
        # same on every redelivery, so it takes part in duplicate detection.
        event_id, generated = f"{where.source}.{where.modality}.{default_id}", False
    elif generated:
        event_id = f"{where.source}.{where.modality}.{ts}.{next(_counter)}"
    elif len(event_id or "") > MAX_ID_LENGTH:
        raise EventRejected("bad_header", f"header {ID_HEADER} is longer than {MAX_ID_LENGTH} characters")
    return InputEvent(
        subject=subject,
        source=where.source,
        modality=where.modality,
        ts_ns=ts,
        content_type=ct,
        payload=payload,
        event_id=cast(str, event_id),
        generated_id=generated,
        seq=seq,
        traceparent=trace,
        received_ns=received_ns,
        delivery=default_id,
    )


def encode_headers(
    ts_ns: Nanos,
    content_type: str,
    *,
    event_id: str | None = None,
    seq: int | None = None,
    traceparent: str | None = None,
) -> dict[str, str]:
    """Headers a producer sends with one event (used by ``autoglm publish``/demo)."""
    hdrs = {TIMESTAMP_HEADER: str(ts_ns), CONTENT_TYPE_HEADER: content_type}
    if event_id is not None:
        hdrs[ID_HEADER] = event_id
    if seq is not None:
        hdrs[SEQ_HEADER] = str(seq)
    if traceparent is not None:
        hdrs[TRACE_HEADER] = traceparent
    return hdrs


# -- compatibility: subjects moved to engine.contracts.subjects ------------------------
# Kept only while engine.runtime.engine and engine.tools.replay still import them
# from here; new code holds a Subjects and asks it.
