"""Audio features: WAV/PCM decode, resample, MFCCs, loudness, voice activity.

``mfcc(samples, sample_rate, n_mfcc=13)`` is public for people who want the
features without the engine; it returns ``(n_mfcc, frames)``.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import librosa
import numpy as np
import numpy.typing as npt
import soundfile

from engine.errors import DecodeError, EventRejected
from engine.types import ContentType, Features, InputEvent, Modality
from processors.params import AudioParams

F32 = npt.NDArray[np.float32]
_EPS = 1e-10


def check_wav(payload: bytes) -> None:
    """Refuse a RIFF/WAVE body whose data chunk is cut short (libsndfile would
    quietly read what is there)."""
    if len(payload) < 12 or payload[:4] != b"RIFF" or payload[8:12] != b"WAVE":
        raise DecodeError("decode_error", "body is not a RIFF/WAVE file")
    i = 12
    while i + 8 <= len(payload):
        chunk, size = payload[i : i + 4], struct.unpack("<I", payload[i + 4 : i + 8])[0]
        if chunk == b"data":
            have = len(payload) - i - 8
            if size != 0xFFFFFFFF and have < size:  # 0xFFFFFFFF: streaming, size unknown
                raise DecodeError(
                    "decode_error", f"truncated WAV: data chunk declares {size} bytes, body has {have}"
                )
            return
        i += 8 + size + (size & 1)
    raise DecodeError("decode_error", "WAV has no data chunk")


def decode_audio(payload: bytes, ct: ContentType) -> tuple[F32, int]:
    """Decode to ``(channels, samples)`` float32 in [-1, 1] and the sample rate."""
    if ct.mime == "audio/pcm":
        rate, channels = int(ct.params["rate"]), int(ct.params["channels"])
        fmt = ct.params["format"].lower()
        width = 2 if fmt == "s16le" else 4
        if len(payload) % (width * channels):
            raise DecodeError(
                "decode_error",
                f"PCM body of {len(payload)} bytes is not a whole number of {fmt} samples "
                f"for {channels} channel(s) ({width * channels} bytes per frame)",
            )
        if fmt == "s16le":
            data = np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0
        else:
            data = np.frombuffer(payload, dtype="<f4").astype(np.float32)
        return np.ascontiguousarray(data.reshape(-1, channels).T), rate
    check_wav(payload)
    try:
        data, rate = soundfile.read(io.BytesIO(payload), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError) as exc:
        raise DecodeError("decode_error", f"WAV does not decode: {exc}") from exc
    return np.ascontiguousarray(np.asarray(data, dtype=np.float32).T), int(rate)


def to_mono(samples: F32, rate: int, target_rate: int, max_seconds: float) -> F32:
    """``(C, N)`` -> ``(N',)`` mono at ``target_rate``; refuses NaN/inf and overlong audio."""
    if samples.shape[1] == 0:
        raise DecodeError("decode_error", "audio has no samples")
    if not np.isfinite(samples).all():
        raise EventRejected("invalid_samples", "audio contains NaN or infinite samples")
    seconds = samples.shape[1] / rate
    if seconds > max_seconds:
        raise EventRejected(
            "payload_too_large", f"audio is {seconds:.1f} s, over max_seconds = {max_seconds}"
        )
    mono = samples.mean(axis=0)
    if rate != target_rate:
        mono = librosa.resample(mono, orig_sr=rate, target_sr=target_rate, res_type="soxr_hq")
    return np.asarray(mono, dtype=np.float32)


def mfcc(
    samples: F32,
    sample_rate: int,
    n_mfcc: int = 13,
    *,
    n_fft: int = 512,
    hop_length: int = 160,
    n_mels: int = 40,
) -> F32:
    """MFCCs of mono ``samples`` ``(N,)`` -> ``(n_mfcc, frames)`` (librosa reference)."""
    out = librosa.feature.mfcc(
        y=np.asarray(samples, dtype=np.float32),
        sr=sample_rate,
        n_mfcc=n_mfcc,
        n_fft=n_fft,
        hop_length=hop_length,
        n_mels=n_mels,
    )
    return np.asarray(out, dtype=np.float32)


def loudness(samples: F32, sample_rate: int, params: AudioParams) -> dict[str, float]:
    """RMS loudness (dBFS), share of frames above the VAD threshold, spectral centroid (Hz)."""
    rms = float(np.sqrt(np.mean(np.square(samples)) + _EPS))
    frame_rms = librosa.feature.rms(y=samples, frame_length=params.n_fft, hop_length=params.hop_length)[0]
    frame_db = 20 * np.log10(frame_rms + _EPS)
    centroid = librosa.feature.spectral_centroid(
        y=samples, sr=sample_rate, n_fft=params.n_fft, hop_length=params.hop_length
    )
    return {
        "loudness_dbfs": 20 * float(np.log10(rms)),
        "voice_ratio": float((frame_db > params.vad_threshold_db).mean()),
        "centroid_hz": float(np.mean(centroid)),
    }


@dataclass(frozen=True, slots=True)
class PreparedAudio:
    samples: F32  # (N,) mono at the route's sample rate


class AudioProcessor:
    """MFCC ``(n_mfcc, T)`` plus loudness/VAD/centroid per audio chunk."""

    modality: Modality = "audio"

    def __init__(self, params: AudioParams) -> None:
        self.params = params

    def prepare(self, event: InputEvent) -> PreparedAudio:
        samples, rate = decode_audio(event.payload, event.content_type)
        p = self.params
        return PreparedAudio(to_mono(samples, rate, p.sample_rate, p.max_seconds))

    def run(self, items: Sequence[PreparedAudio]) -> list[Features]:
        p = self.params
        out = []
        for it in items:
            m = mfcc(
                it.samples, p.sample_rate, p.n_mfcc, n_fft=p.n_fft, hop_length=p.hop_length, n_mels=p.n_mels
            )
            out.append(Features("audio", frames=m, stats=loudness(it.samples, p.sample_rate, p)))
        return out


def create(params: AudioParams, modality: Modality, device: str) -> AudioProcessor:
    return AudioProcessor(params)
