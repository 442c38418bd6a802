"""engine/wire/headers.py: nats-py's header rules, faster; equal to nats-py's own on any bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.wire.headers import parse_header_lines
from engine.wire.natsguard import NATS_PARSE_HEADER_LINES

nats_parse = NATS_PARSE_HEADER_LINES


def test_every_ascii_character_in_a_name_is_judged_as_nats_py_judges_it() -> None:
    for code in range(128):
        raw = b"A" + bytes([code]) + b"B: v\r\nOk: 1\r\n"
        assert parse_header_lines(raw) == nats_parse(raw), hex(code)


def test_the_engine_headers_and_the_odd_forms() -> None:
    for raw in [
        b"AutoGLM-Timestamp: 1764000000000000000\r\nContent-Type: image/jpeg\r\nNats-Msg-Id: cam-1\r\n\r\n",
        b"Name:Value\r\nName2:\tValue\r\n no-colon\r\n",
        b"Caf\xc3\xa9: x\r\nK: caf\xc3\xa9 \xff\r\n",
        b"Dup: 1\r\nDup: 2\r\n",
        b": empty name\r\n\r\n\r\n",
        b"",
    ]:
        assert parse_header_lines(raw) == nats_parse(raw), raw


lines = st.one_of(
    st.binary(max_size=30),
    st.builds(
        lambda n, sep, v: n + sep + v,
        st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=12).map(str.encode),
        st.sampled_from([b":", b": ", b":\t", b" : "]),
        st.binary(max_size=20),
    ),
)


@settings(max_examples=2000)
@given(st.lists(lines, max_size=8), st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n"]))
def test_equal_to_nats_py_on_arbitrary_header_blocks(parts: list[bytes], joiner: bytes) -> None:
    raw = joiner.join(parts)
    assert parse_header_lines(raw) == nats_parse(raw)
