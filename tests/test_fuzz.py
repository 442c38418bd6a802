"""Hostile input: random headers and bodies through the codec and every processor.

Nothing may escape but a refusal with a reason code: every input ends as an
event the processors turn into features, or as a DLQ reason.
"""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config.models import RouteConfig
from engine.contracts.errors import REASONS, EventRejected
from engine.contracts.types import Features
from engine.pipeline.router import Route
from engine.runtime.build import build_route
from engine.wire.codec import decode_event

TS = "1764000000000000000"
CONTENT_TYPES = [
    "image/jpeg", "image/png", "image/x-raw;format=bgr8;width=4;height=3", "image/x-raw;width=0;height=x",
    "audio/wav", "audio/pcm;rate=16000;channels=1;format=s16le",
    "audio/pcm;rate=8000;channels=3;format=f32le",
    "audio/pcm;rate=0;channels=1;format=s16le", "text/plain", "text/plain;charset=utf-8", "video/mp4", "",
    "image/png;;=", "audio/pcm;rate=99999999999999999999;channels=1;format=f32le",
]  # fmt: skip


def _samples() -> list[bytes]:
    img = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", img)[1].tobytes()
    png = cv2.imencode(".png", img)[1].tobytes()
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(800), 16_000, format="WAV")
    wav = buf.getvalue()
    return [jpeg, png, wav, img.tobytes()[:36], "héllo wörld".encode()]


SAMPLES = _samples()


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=2048))
    base = draw(st.sampled_from(SAMPLES))
    if kind == 1:  # truncated
        return base[: draw(st.integers(0, len(base)))]
    if kind == 2:  # one corrupted byte range
        i = draw(st.integers(0, len(base) - 1))
        return base[:i] + draw(st.binary(min_size=1, max_size=16)) + base[i + 16 :]
    return base


@st.composite
def headers(draw: st.DrawFn) -> dict[str, str]:
    h: dict[str, str] = {}
    if draw(st.integers(0, 9)):
        h["AutoGLM-Timestamp"] = draw(st.sampled_from([TS, "0", "-1", "abc", TS + "0" * 5, ""]))
    if draw(st.integers(0, 9)):
        ct = draw(st.sampled_from(CONTENT_TYPES))
        h["Content-Type"] = ct if draw(st.integers(0, 5)) else ct + draw(st.text(max_size=12))
    for name in ("Nats-Msg-Id", "AutoGLM-Seq", "traceparent"):
        if draw(st.booleans()):
            h[name] = draw(st.text(max_size=40))
    return h


@pytest.fixture(scope="module")
def routes() -> dict[str, Route]:
    out = {}
    for modality, processor, params in (
        ("image", "cnn", {"faces": True, "max_pixels": 10_000}),
        ("audio", "mfcc", {"max_seconds": 2}),
        ("text", "minilm", {"max_chars": 500}),
    ):
        cfg = RouteConfig(modality=modality, processor=processor, device="cpu", params=params)  # type: ignore[arg-type]
        out[modality] = build_route(cfg, modality)
    return out


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    subject=st.sampled_from(
        ["autoglm.in.cam.image", "autoglm.in.mic.audio", "autoglm.in.t.text", "autoglm.in.x"]
    ),
    hdrs=headers(),
    body=bodies(),
)
def test_every_input_ends_in_features_or_a_reason(
    routes: dict[str, Route], subject: str, hdrs: dict[str, str], body: bytes
) -> None:
    try:
        event = decode_event(subject, hdrs, body)
    except EventRejected as exc:
        assert exc.reason in REASONS and exc.message
        return
    [outcome] = routes[event.modality].process([event])
    if isinstance(outcome, EventRejected):
        assert outcome.reason in REASONS and outcome.message
    else:
        assert isinstance(outcome, Features) and outcome.modality == event.modality


def test_the_fuzzer_reaches_the_processors(routes: dict[str, Route]) -> None:
    """Guard against a fuzz test that only ever exercises the codec."""
    ok: list[Any] = []
    for body, ct, mod in ((SAMPLES[0], "image/jpeg", "image"), (SAMPLES[2], "audio/wav", "audio")):
        event = decode_event(f"autoglm.in.s.{mod}", {"AutoGLM-Timestamp": TS, "Content-Type": ct}, body)
        ok += routes[mod].process([event])
    assert all(isinstance(o, Features) for o in ok)
