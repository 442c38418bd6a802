"""The built-in processors on real inputs, with real (offline) models."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import cv2
import numpy as np
import pytest
import soundfile

from engine.contracts.errors import ConfigError, EventRejected
from engine.contracts.types import InputEvent
from engine.wire.codec import decode_event, encode_headers
from processors import audio as audio_mod
from processors.registry import lookup

TS = 1_764_000_000_000_000_000


def event(modality: str, body: bytes, ct: str, source: str = "s") -> InputEvent:
    return decode_event(f"autoglm.in.{source}.{modality}", encode_headers(TS, ct), body)


@pytest.fixture(scope="module")
def image_proc() -> Any:
    return lookup("cnn").create({"weights": "random"}, "image", "cpu")


@pytest.fixture(scope="module")
def text_proc() -> Any:
    return lookup("minilm").create({"max_tokens": 16}, "text", "cpu")


@pytest.fixture(scope="module")
def audio_proc() -> Any:
    return lookup("mfcc").create({}, "audio", "cpu")


def reason(proc: Any, ev: InputEvent) -> str:
    with pytest.raises(EventRejected) as info:
        proc.prepare(ev)
    return info.value.reason


def scene(shift: int = 0) -> np.ndarray:
    img = np.zeros((120, 160, 3), np.uint8)
    cv2.rectangle(img, (20 + shift, 30), (60 + shift, 90), (0, 0, 255), -1)
    return img


def test_image_formats_embed_to_the_same_shape(image_proc: Any) -> None:
    img = scene()
    jpeg = cv2.imencode(".jpg", img)[1].tobytes()
    png = cv2.imencode(".png", img)[1].tobytes()
    items = [
        image_proc.prepare(event("image", jpeg, "image/jpeg")),
        image_proc.prepare(event("image", png, "image/png")),
        image_proc.prepare(event("image", img.tobytes(), "image/x-raw;format=bgr8;width=160;height=120")),
    ]
    feats = image_proc.run(items)
    assert [f.embedding.shape for f in feats] == [(576,)] * 3
    # PNG and raw are the same pixels -> the same embedding; JPEG is close.
    assert np.allclose(feats[1].embedding, feats[2].embedding, atol=1e-5)
    assert feats[0].stats["hue_red"] > 0.05  # the red square shows in the hue histogram
    assert 0 < feats[0].stats["brightness"] < 0.5


def test_motion_is_measured_per_source_in_batch_order(image_proc: Any) -> None:
    raw = "image/x-raw;width=160;height=120"
    frames = [("m1", scene(0)), ("m2", scene(60)), ("m1", scene(60)), ("m1", scene(60))]
    items = [image_proc.prepare(event("image", img.tobytes(), raw, src)) for src, img in frames]
    moves = [f.stats["motion"] for f in image_proc.run(items)]
    assert moves[0] == 0.0 and moves[1] == 0.0  # first frame of each source
    assert moves[2] > 0.01  # m1 moved
    assert moves[3] == 0.0  # and then stood still


def test_parallel_prepare_gives_the_same_features(image_proc: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from engine.config.models import RouteConfig
    from engine.pipeline.batcher import Batcher
    from engine.pipeline.router import Route

    jpegs = [cv2.imencode(".jpg", scene(i * 10))[1].tobytes() for i in range(6)]
    evs = [event("image", j, "image/jpeg", "par") for j in jpegs]
    cfg = RouteConfig(modality="image", processor="cnn", prepare_threads=3)
    batcher: Batcher[InputEvent] = Batcher(max_batch_size=8, max_wait_ns=0, max_queue=8)
    serial = Route("a", cfg, image_proc, batcher, prepare_pool=None)
    serial.prepare_pool = None  # force the one-thread path for the reference
    parallel = Route("b", cfg, image_proc, batcher, prepare_pool=ThreadPoolExecutor(3))
    ref = serial.process(evs)
    image_proc._previous.clear()
    got = parallel.process(evs)
    parallel.close()
    for r, g in zip(ref, got, strict=True):
        assert np.allclose(r.embedding, g.embedding)  # type: ignore[union-attr]
        assert r.stats == g.stats  # type: ignore[union-attr]


def test_image_rejections(image_proc: Any) -> None:
    jpeg = cv2.imencode(".jpg", scene())[1].tobytes()
    assert reason(image_proc, event("image", jpeg[:200], "image/jpeg")) == "decode_error"
    assert reason(image_proc, event("image", b"GIF89a....", "image/jpeg")) == "decode_error"
    assert reason(image_proc, event("image", b"\x00" * 10, "image/x-raw;width=4;height=4")) == "decode_error"
    # A 20,000 x 20,000 PNG "bomb": refused from its header, never decoded.
    ihdr = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    with pytest.raises(EventRejected, match="20000x20000") as info:
        image_proc.prepare(event("image", bomb, "image/png"))
    assert info.value.reason == "image_too_large"


def test_imagenet_weights_missing_fail_clearly(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="no weights file"):
        lookup("cnn").create({"weights": "imagenet", "weights_path": str(tmp_path / "x.pth")}, "image", "cpu")


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_audio_is_resampled_downmixed_and_described(audio_proc: Any) -> None:
    rate = 44_100
    t = np.arange(rate // 2) / rate
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    stereo = np.stack([tone, tone], axis=1)
    [feat] = audio_proc.run([audio_proc.prepare(event("audio", wav_bytes(stereo, rate), "audio/wav"))])
    assert feat.frames.shape == (13, 8000 // 160 + 1)  # 0.5 s at 16 kHz, hop 160
    assert feat.stats["loudness_dbfs"] == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=0.3)
    assert feat.stats["centroid_hz"] == pytest.approx(1000, rel=0.15)
    assert feat.stats["voice_ratio"] == 1.0
    quiet = np.zeros(1600, "<i2").tobytes()
    [silent] = audio_proc.run(
        [audio_proc.prepare(event("audio", quiet, "audio/pcm;rate=16000;channels=1;format=s16le"))]
    )
    assert silent.stats["voice_ratio"] == 0.0


def test_public_mfcc_matches_librosa() -> None:
    import librosa

    y = np.random.default_rng(0).normal(0, 0.1, 16_000).astype(np.float32)
    ours = audio_mod.mfcc(y, 16_000, n_mfcc=20)
    ref = librosa.feature.mfcc(y=y, sr=16_000, n_mfcc=20, n_fft=512, hop_length=160, n_mels=40)
    assert ours.shape == (20, 101)
    assert np.allclose(ours, ref)


def test_audio_rejections(audio_proc: Any) -> None:
    wav = wav_bytes(np.zeros(1600), 16_000)
    assert reason(audio_proc, event("audio", wav[:-100], "audio/wav")) == "decode_error"
    assert reason(audio_proc, event("audio", b"RIFF....junk", "audio/wav")) == "decode_error"
    pcm = "audio/pcm;rate=16000;channels=2;format=s16le"
    assert reason(audio_proc, event("audio", b"\x00" * 6, pcm)) == "decode_error"  # 1.5 frames
    nan = np.array([0.0, np.inf], "<f4").tobytes()
    assert reason(audio_proc, event("audio", nan, "audio/pcm;rate=16000;channels=1;format=f32le")) == (
        "invalid_samples"
    )
    f32 = "audio/pcm;rate=16000;channels=1;format=f32le"
    for bad in (np.nan, -np.inf, 1e30, -17.0):
        body = np.full(1600, 0.1, "<f4")
        body[800] = bad
        assert reason(audio_proc, event("audio", body.tobytes(), f32)) == "invalid_samples"
    huge = np.full((1600, 2), 1e30, "<f4")
    with pytest.raises(EventRejected, match=r"magnitude 1e\+30.*big-endian") as info:
        audio_proc.prepare(event("audio", wav_bytes(huge, 16_000, "FLOAT"), "audio/wav"))
    assert info.value.reason == "invalid_samples"
    long = np.zeros(16_000 * 31, "<i2").tobytes()
    assert reason(audio_proc, event("audio", long, "audio/pcm;rate=16000;channels=1;format=s16le")) == (
        "audio_too_long"
    )


def test_float_audio_above_full_scale_keeps_a_finite_loudness(audio_proc: Any) -> None:
    """A finite f32le body of 1e30 gave a ``null`` loudness (float32 squares
    overflow); now such a body is refused (above), and float audio with
    headroom up to 16.0 is measured as it is, on both backends."""
    from processors.audio import AudioProcessor
    from processors.params import AudioParams

    f32 = "audio/pcm;rate=16000;channels=1;format=f32le"
    loud = np.full(1600, 10.0, "<f4")
    loud[::2] = -10.0  # a +20 dBFS square wave
    for backend in ("torch", "librosa"):
        proc = AudioProcessor(AudioParams(backend=backend), "cpu")
        [f] = proc.run([proc.prepare(event("audio", loud.tobytes(), f32))])
        assert f.stats["loudness_dbfs"] == pytest.approx(20.0, abs=0.01), backend
        assert np.isfinite(f.frames).all() and all(np.isfinite(v) for v in f.stats.values())


def test_text_embeddings_are_normalised_and_meaningful(text_proc: Any) -> None:
    texts = ["a dog runs in the park", "a puppy is running on the grass", "quarterly tax filing deadline"]
    feats = text_proc.run([text_proc.prepare(event("text", t.encode(), "text/plain")) for t in texts])
    vecs = np.stack([f.embedding for f in feats])
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2


def test_text_batching_matches_one_at_a_time(text_proc: Any) -> None:
    texts = ["short", "a much longer sentence that needs more padding tokens"]
    batch = text_proc.run([text_proc.prepare(event("text", t.encode(), "text/plain")) for t in texts])
    single = [text_proc.run([text_proc.prepare(event("text", t.encode(), "text/plain"))])[0] for t in texts]
    for b, s in zip(batch, single, strict=True):
        assert np.allclose(b.embedding, s.embedding, atol=1e-5)


def test_text_normalisation_truncation_and_rejections(text_proc: Any) -> None:
    decomposed = "cafe\u0301".encode()
    [f] = text_proc.run([text_proc.prepare(event("text", decomposed, "text/plain"))])
    assert f.text == "caf\u00e9"  # NFC
    long = " ".join(["word"] * 40).encode()
    [g] = text_proc.run([text_proc.prepare(event("text", long, "text/plain"))])
    assert g.stats["truncated"] == 1.0 and g.stats["tokens"] > 16
    assert reason(text_proc, event("text", b"ok \xff", "text/plain")) == "invalid_utf8"
    assert reason(text_proc, event("text", b"x" * 20_001, "text/plain")) == "text_too_long"


def test_torch_mfcc_matches_librosa_reference() -> None:
    """The batched torch path against librosa.feature.mfcc on the same input.

    Bound: 1e-3 absolute on MFCCs whose values span hundreds (measured here:
    about 5e-5; silence about 2e-4), i.e. float32 rounding, not a different
    recipe. Loudness, voice ratio and centroid agree to 1e-3 relative.
    """
    from processors.audio import AudioProcessor, PreparedAudio
    from processors.params import AudioParams

    rng = np.random.default_rng(7)
    t = np.arange(16_000) / 16_000
    items = [
        PreparedAudio(
            (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + rng.normal(0, 0.02, t.size)).astype(np.float32)
        )
        for i in range(6)
    ]
    items.append(PreparedAudio(np.zeros(1600, np.float32)))  # silence, another length
    items.append(PreparedAudio(rng.normal(0, 0.1, 1234).astype(np.float32)))  # odd length
    params = {"n_mfcc": 20, "n_mels": 64}
    fast = AudioProcessor(AudioParams(backend="torch", **params), "cpu").run(items)
    ref = AudioProcessor(AudioParams(backend="librosa", **params), "cpu").run(items)
    worst = 0.0
    for f, r in zip(fast, ref, strict=True):
        assert f.frames.shape == r.frames.shape
        worst = max(worst, float(np.abs(f.frames - r.frames).max()))
        for key in ("loudness_dbfs", "voice_ratio", "centroid_hz"):
            assert f.stats[key] == pytest.approx(r.stats[key], rel=1e-3, abs=1e-3), key
    print(f"max |torch - librosa| MFCC difference: {worst:.2e}")
    assert worst < 1e-3


def test_imagenet_weights_from_a_file_give_labels(tmp_path: Any) -> None:
    import torch
    import torchvision

    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    proc = lookup("cnn").create(
        {"weights": "imagenet", "weights_path": str(path), "faces": False}, "image", "cpu"
    )
    jpeg = cv2.imencode(".jpg", scene())[1].tobytes()
    [f] = proc.run([proc.prepare(event("image", jpeg, "image/jpeg"))])
    assert len(f.labels) == 5 and all(isinstance(x, str) and x for x in f.labels)


def test_half_precision_is_for_cuda_only() -> None:
    import torch

    proc = lookup("cnn").create({"faces": False}, "image", "cpu", "float16")
    assert proc.dtype == torch.float32  # a CPU route keeps float32 whatever dtype says


def test_thumbnail_for_vision_glms() -> None:
    proc = lookup("cnn").create({"thumbnail": 64, "faces": False}, "image", "cpu")
    jpeg = cv2.imencode(".jpg", scene())[1].tobytes()
    [f] = proc.run([proc.prepare(event("image", jpeg, "image/jpeg"))])
    assert f.attachment is not None
    thumb = cv2.imdecode(np.frombuffer(f.attachment, np.uint8), cv2.IMREAD_COLOR)
    assert max(thumb.shape[:2]) == 64
