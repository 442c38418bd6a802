"""Hostile and awkward images: the pixel limit as the decoder sees it, OpenCV's own cap."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from engine.contracts.errors import EventRejected
from engine.contracts.types import ContentType, Features, InputEvent
from engine.wire.codec import decode_event, encode_headers
from processors.image import decode_image, jpeg_size
from processors.registry import lookup

ROOT = Path(__file__).resolve().parent.parent
TS = 1_764_000_000_000_000_000
JPEG = ContentType("image/jpeg")


def event(body: bytes, ct: str = "image/jpeg") -> InputEvent:
    return decode_event("autoglm.in.cam.image", encode_headers(TS, ct), body)


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Photo-like content: smooth gradients, a few shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1).astype(np.uint8)
    for _ in range(4):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(5, max(6, min(w, h) // 3))), rng.integers(0, 255, 3).tolist(), -1)
    return cv2.add(img, rng.integers(0, 40, (h, w, 3), dtype=np.uint8))


def jpeg(w: int, h: int, seed: int = 0) -> bytes:
    return bytes(cv2.imencode(".jpg", photo(w, h, seed))[1].tobytes())


def sof_at(data: bytes) -> int:
    """Offset of the encoder's own (first, real) SOF0 marker."""
    return data.index(b"\xff\xc0")


def with_size(data: bytes, w: int, h: int) -> bytes:
    """The same JPEG with its frame header declaring w x h: libjpeg decodes
    that many pixels from a few hundred bytes (a decompression bomb)."""
    k = sof_at(data)
    return data[: k + 5] + struct.pack(">HH", h, w) + data[k + 9 :]


def fake_sof_behind_tem(data: bytes, w: int, h: int) -> bytes:
    """Issue 12, item 9: SOI, TEM (0xFF01, no length), then an APP1 segment
    that libjpeg skips. A walk that reads a length after TEM reads the next
    marker's bytes (0xFFE1 = 65505) and lands inside the APP1, on a fake SOF0
    declaring w x h; libjpeg goes on to the real frame header."""
    app1 = bytearray(0xFFFF - 2)
    land = 2 + 2 + 0xFFE1  # where that walk lands, from the start of the file
    fake = b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", h, w) + b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    app1[land - 8 : land - 8 + len(fake)] = fake  # APP1 data starts at byte 8
    return data[:2] + b"\xff\x01" + b"\xff\xe1" + struct.pack(">H", 0xFFFF) + bytes(app1) + data[2:]


def test_a_frame_header_hidden_behind_tem_cannot_bypass_the_pixel_limit() -> None:
    """The engine saw 16 x 16 and libjpeg decoded 7000 x 7000 (49 Mpx, over
    the default 40 Mpx limit); now the size checked is libjpeg's, and the
    image is refused from its header, before any decoding."""
    proc = lookup("cnn").create({"faces": False}, "image", "cpu")
    bomb = fake_sof_behind_tem(with_size(jpeg(64, 48), 7000, 7000), 16, 16)
    assert len(bomb) < 70_000
    assert jpeg_size(bomb) == (7000, 7000)
    with pytest.raises(EventRejected, match="7000x7000 = 49000000 pixels") as info:
        proc.prepare(event(bomb))
    assert info.value.reason == "image_too_large"


def _variants(data: bytes) -> dict[str, bytes]:
    k = sof_at(data)
    return {
        "as encoded": data,
        "fake small SOF behind TEM": fake_sof_behind_tem(data, 16, 16),
        "fake huge SOF behind TEM": fake_sof_behind_tem(data, 9000, 9000),
        "RST marker before the SOF": data[:k] + b"\xff\xd3" + data[k:],
        "TEM right after SOI": data[:2] + b"\xff\x01" + data[2:],
        "fill bytes before the SOF": data[:k] + b"\xff\xff\xff" + data[k:],
        "stray bytes before the SOF": data[:k] + b"\x00\x12\x34" + data[k:],
        "stuffed zero before the SOF": data[:k] + b"\xff\x00" + data[k:],
        "empty COM": data[:2] + b"\xff\xfe\x00\x02" + data[2:],
        "COM with a length under 2": data[:2] + b"\xff\xfe\x00\x00" + data[2:],
        "DNL segment": data[:k] + b"\xff\xdc\x00\x04\x00\x10" + data[k:],
        "second SOI": data[:2] + data,
        "reserved marker": data[:2] + b"\xff\x02" + data[2:],
        "SOS before the SOF": data[:2] + b"\xff\xda\x00\x02" + data[2:],
    }


@pytest.mark.parametrize("name", list(_variants(b"\xff\xc0")))
def test_the_size_checked_is_the_size_libjpeg_decodes(name: str) -> None:
    """Whenever OpenCV decodes a variant, jpeg_size gave exactly its size;
    when OpenCV refuses it, so does jpeg_size or the decode."""
    data = _variants(jpeg(40, 30))[name]
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        with pytest.raises(EventRejected) as info:
            decode_image(data, JPEG, max_pixels=10_000)
        assert info.value.reason == "decode_error"
        return
    assert jpeg_size(data) == (decoded.shape[1], decoded.shape[0]) == (40, 30)
    assert decode_image(data, JPEG, max_pixels=10_000).shape == (30, 40, 3)


def test_jpeg_walk_is_linear_in_fill_bytes() -> None:
    data = jpeg(40, 30)
    padded = data[:2] + b"\xff" * 4_000_000 + data[2:]
    assert jpeg_size(padded) == (40, 30)  # a quadratic scan would take minutes here
    assert cv2.imdecode(np.frombuffer(padded, np.uint8), cv2.IMREAD_COLOR).shape == (30, 40, 3)


_CAP_SCRIPT = r"""
import os, sys
import engine.runtime.engine, engine.tools.cli, engine.config.models
import engine.tools.demo, engine.tools.replay, processors.audio, processors.text
assert "cv2" not in sys.modules, "something imports OpenCV before the routes are built"
from processors.registry import lookup
from engine.contracts.errors import ConfigError, EventRejected
from engine.contracts.types import ContentType

proc = lookup("cnn").create({"max_pixels": 10_000, "faces": False}, "image", "cpu")
import cv2, numpy as np
from processors.image import OPENCV_MAX_PIXELS, decode_image
print("cap", os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"], OPENCV_MAX_PIXELS)
body = cv2.imencode(".jpg", np.zeros((200, 200, 3), np.uint8))[1]
try:  # straight to OpenCV: no header check of ours in the way
    cv2.imdecode(body, cv2.IMREAD_COLOR)
    print("opencv decoded")
except cv2.error as exc:
    print("opencv refused", "CV_IO_MAX_IMAGE_PIXELS" in str(exc))
try:  # as if our header check had been fooled into allowing it
    decode_image(body.tobytes(), ContentType("image/jpeg"), max_pixels=10**9)
    print("decode_image decoded")
except EventRejected as exc:
    print("decode_image refused", exc.reason)
try:
    lookup("cnn").create({"max_pixels": 20_000, "faces": False}, "image", "cpu")
    print("second route built")
except ConfigError as exc:
    print("second route refused", "OPENCV_IO_MAX_IMAGE_PIXELS=20000" in str(exc))
"""


def test_opencv_pixel_cap_holds_on_its_own() -> None:
    """The backstop: the first image route sets OpenCV's own cap from its
    max_pixels before OpenCV loads; OpenCV then refuses a bigger image even
    with no header check in front, decode_image reports that as
    image_too_large, and a route that would need a higher cap is refused at
    build time rather than failing on every large image."""
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [sys.executable, "-c", _CAP_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "cap 10000 10000",
        "opencv refused True",
        "decode_image refused image_too_large",
        "second route refused True",
    ]


# -- face detection across prepare threads ------------------------------------------

#: Photo sizes of the issue's report (300 x 451 to 640 x 427), portrait and landscape.
SIZES = [(300, 451), (640, 427), (480, 360), (427, 640), (512, 512), (333, 500), (451, 300)]


def _mixed_frames() -> list[InputEvent]:
    frames = []
    for i, (w, h) in enumerate(SIZES):
        img = photo(w, h, seed=i)
        frames.append(event(bytes(cv2.imencode(".jpg", img)[1].tobytes())))
        frames.append(event(bytes(cv2.imencode(".png", img)[1].tobytes()), "image/png"))
    return frames


def test_face_detection_with_mixed_sizes_on_two_prepare_threads_never_fails() -> None:
    """One CascadeClassifier shared by the prepare threads raised OpenCV
    assertions (``cascadedetect.hpp``, ``vector::_M_range_check``) with frames
    of different sizes in flight, reported as the producer's decode_error, and
    could abort the process. Batches of mixed photos go through a route with
    prepare_threads = 2, two batches at a time, many times: every frame gets
    its features, and the same face count as when prepared alone."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.config.models import RouteConfig
    from engine.contracts.types import Features
    from engine.runtime.build import build_route

    route = build_route(
        RouteConfig(modality="image", processor="cnn", device="cpu", prepare_threads=2), "image"
    )
    frames = _mixed_frames()
    alone = {ev.event_id: route.processor.prepare(ev).stats["faces"] for ev in frames}
    batches = [frames[i:] + frames[:i] for i in range(len(frames))] * 3  # every order, 42 batches
    try:
        with ThreadPoolExecutor(2) as workers:  # two batches at once, like workers = 2
            outcomes = [o for batch in workers.map(route.process, batches) for o in batch]
    finally:
        route.close()
    rejected = [o for o in outcomes if isinstance(o, EventRejected)]
    assert not rejected, rejected[:3]
    assert len(outcomes) == len(frames) * len(batches)
    faces = [o.stats["faces"] for o in outcomes if isinstance(o, Features)]
    assert len(faces) == len(outcomes)
    assert sorted(set(faces)) == sorted(set(alone.values()))
    assert route.processor.face_failures == 0  # type: ignore[attr-defined]


def test_a_long_thin_png_is_processed_with_no_faces() -> None:
    """A valid 8000 x 4 PNG failed inside the face detector (scaled to 320
    pixels its 4 rows became 0, and resize refused)."""
    proc = lookup("cnn").create({}, "image", "cpu")
    for w, h in ((8000, 4), (4, 8000), (3000, 30), (24, 24)):
        png = bytes(cv2.imencode(".png", photo(w, h))[1].tobytes())
        [feat] = proc.run([proc.prepare(event(png, "image/png"))])
        assert feat.stats["faces"] == 0.0, (w, h)
    assert proc.face_failures == 0


def test_a_detector_failure_leaves_faces_out_and_is_counted_not_a_decode_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Should OpenCV's detector fail anyway, the frame (which decoded fine)
    keeps its features without ``faces``; the failure is logged and counted
    in ``autoglm_processor_faults``, never charged to the producer."""
    from engine.config.models import RouteConfig
    from engine.observe.metrics import EngineCollector
    from engine.runtime.build import build_route
    from engine.runtime.engine import Engine
    from tests.conftest import make_config

    route = build_route(RouteConfig(modality="image", processor="cnn", device="cpu"), "image")
    proc: Any = route.processor
    proc._local.faces = cv2.CascadeClassifier()  # this thread's detector: real, but with no cascade loaded
    [outcome] = route.process([event(jpeg(320, 240))])
    assert not isinstance(outcome, EventRejected), outcome
    assert "faces" not in outcome.stats and "brightness" in outcome.stats
    assert proc.face_failures == 1
    assert "face detection failed on a 320x240 frame" in caplog.text
    engine = Engine(make_config("faults"), routes=[route])
    [family] = [f for f in EngineCollector(engine.snapshot).collect() if f.name == "autoglm_processor_faults"]
    assert [(s.labels, s.value) for s in family.samples] == [
        ({"route": "image:cnn", "kind": "face_detection"}, 1.0)
    ]


def test_a_frame_that_barely_changed_reuses_its_sources_last_embedding_and_says_so() -> None:
    """Adaptive inference (``reuse_below``): a near-copy of a source's last
    embedded frame gets that embedding without the CNN; a different frame, a
    slow drift past the threshold, or another source's frame gets a fresh
    one. Counted in ``autoglm_processor_events{kind="reused"}``."""
    from engine.config.models import RouteConfig
    from engine.observe.metrics import EngineCollector
    from engine.runtime.build import build_route
    from engine.runtime.engine import Engine
    from tests.conftest import make_config

    route = build_route(
        RouteConfig(modality="image", processor="cnn", device="cpu", params={"reuse_below": 0.02}), "image"
    )
    proc: Any = route.processor
    base = photo(320, 240, seed=1)

    def frame(img: np.ndarray, source: str = "cam") -> InputEvent:
        body = bytes(cv2.imencode(".png", img)[1].tobytes())
        return decode_event(f"autoglm.in.{source}.image", encode_headers(TS, "image/png"), body)

    def brighter(by: int) -> np.ndarray:
        return cv2.add(base, np.full_like(base, by))

    first, same, other_cam = route.process([frame(base), frame(brighter(1)), frame(base, "door")])
    assert isinstance(first, Features) and isinstance(same, Features) and isinstance(other_cam, Features)
    # Within one batch each frame is judged against what was kept before it: all fresh.
    assert first.stats["reused"] == same.stats["reused"] == other_cam.stats["reused"] == 0.0
    [again] = route.process([frame(brighter(2))])
    assert again.stats["reused"] == 1.0 and np.array_equal(again.embedding, same.embedding)
    [changed] = route.process([frame(photo(320, 240, seed=9))])
    assert changed.stats["reused"] == 0.0 and not np.array_equal(changed.embedding, same.embedding)
    # A drift of 1/255 per frame: reused while within 2 % of the kept frame, then fresh.
    drift = [
        route.process([frame(cv2.add(photo(320, 240, seed=9), np.full_like(base, k)))])[0]
        for k in range(1, 9)
    ]
    flags = [f.stats["reused"] for f in drift if isinstance(f, Features)]
    assert flags[0] == 1.0 and 0.0 in flags, flags
    assert proc.reused == 1 + flags.count(1.0)
    engine = Engine(make_config("reuse"), routes=[route])
    [family] = [f for f in EngineCollector(engine.snapshot).collect() if f.name == "autoglm_processor_events"]
    assert [(s.labels, s.value) for s in family.samples] == [
        ({"route": "image:cnn", "kind": "reused"}, float(proc.reused))
    ]
    route.close()


def test_without_reuse_below_every_frame_runs_the_cnn() -> None:
    proc = lookup("cnn").create({}, "image", "cpu")
    img = photo(160, 120)
    feats = [
        proc.run([proc.prepare(event(bytes(cv2.imencode(".jpg", img)[1].tobytes())))])[0] for _ in range(3)
    ]
    assert all("reused" not in f.stats for f in feats) and proc.reused == 0
