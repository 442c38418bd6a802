"""Audio features: WAV/PCM decode, resample, MFCCs, loudness, voice activity.

``mfcc(samples, sample_rate, n_mfcc=13)`` is public for people who want the
features without the engine; it returns ``(n_mfcc, frames)``.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import librosa
import numpy as np
import numpy.typing as npt
import scipy.fft
import soundfile
import torch
from torch import nn

from engine.contracts.errors import DecodeError, EventRejected
from engine.contracts.types import ContentType, Features, InputEvent, Modality
from processors.devices import resolve_device, to_device
from processors.params import AudioParams
from processors.vocabulary import AUDIO, AudioVocabulary

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


#: Full scale is 1.0. Floating-point audio may go above it (a float mix keeps
#: headroom), so samples up to 16.0 (+24 dBFS) are taken as they are. Beyond
#: that they are not audio but a wrong format (big-endian or integer samples
#: sent as f32le), and their squares would overflow float32 into an infinite,
#: ``null`` loudness: such a body is refused, not clipped into a square wave.
MAX_SAMPLE: Final = 16.0


def to_mono(samples: F32, rate: int, target_rate: int, max_seconds: float) -> F32:
    """``(C, N)`` -> ``(N',)`` mono at ``target_rate``; refuses NaN/inf, samples
    beyond :data:`MAX_SAMPLE` and overlong audio."""
    if samples.shape[1] == 0:
        raise DecodeError("decode_error", "audio has no samples")
    peak = float(max(samples.max(), -samples.min()))  # NaN if any sample is NaN
    if not peak <= MAX_SAMPLE:
        if not np.isfinite(samples).all():
            raise EventRejected("invalid_samples", "audio contains NaN or infinite samples")
        raise EventRejected(
            "invalid_samples",
            f"audio has a sample of magnitude {peak:.3g}, beyond {MAX_SAMPLE:g} "
            f"(full scale is 1.0): not float audio; big-endian or integer samples sent as f32le?",
        )
    seconds = samples.shape[1] / rate
    if seconds > max_seconds:
        raise EventRejected("audio_too_long", f"audio is {seconds:.1f} s, over max_seconds = {max_seconds}")
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


class TorchMFCC(nn.Module):
    """Batched MFCC + loudness on CPU or CUDA, matching ``librosa.feature.mfcc``.

    Same recipe as librosa's defaults: centred zero-padded STFT with a
    periodic Hann window, power spectrum, Slaney mel filterbank (taken from
    ``librosa.filters.mel``), ``power_to_db`` with ``top_db = 80`` per item,
    orthonormal DCT-II. ``forward`` maps ``(B, N)`` samples to
    ``(B, n_mfcc, T)`` with ``T = 1 + N // hop_length``.
    """

    def __init__(self, sample_rate: int, n_mfcc: int, n_fft: int, hop_length: int, n_mels: int) -> None:
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.window: torch.Tensor
        self.mel: torch.Tensor
        self.dct: torch.Tensor
        self.freqs: torch.Tensor
        mel = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)  # (n_mels, F)
        dct = scipy.fft.dct(np.eye(n_mels), type=2, norm="ortho", axis=0)[:n_mfcc]  # (n_mfcc, n_mels)
        freqs = librosa.fft_frequencies(sr=sample_rate, n_fft=n_fft)  # (F,)
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True))
        self.register_buffer("mel", torch.from_numpy(np.asarray(mel, np.float32)))
        self.register_buffer("dct", torch.from_numpy(np.asarray(dct, np.float32)))
        self.register_buffer("freqs", torch.from_numpy(np.asarray(freqs, np.float32)))

    def power(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` -> power spectrogram ``(B, F, T)``."""
        spec = torch.stft(
            x,
            self.n_fft,
            self.hop_length,
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        return spec.real.square() + spec.imag.square()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, N)`` -> MFCC ``(B, n_mfcc, T)``, frame RMS ``(B, T)``, centroid ``(B, T)``."""
        power = self.power(x)  # (B, F, T)
        mel = torch.matmul(self.mel, power)  # (B, n_mels, T)
        db = 10.0 * torch.log10(mel.clamp(min=1e-10))
        floor = db.amax(dim=(1, 2), keepdim=True) - 80.0  # top_db, per item like librosa
        mfcc = torch.matmul(self.dct, torch.maximum(db, floor))  # (B, n_mfcc, T)
        pad = self.n_fft // 2
        frames = nn.functional.pad(x, (pad, pad)).unfold(1, self.n_fft, self.hop_length)  # (B, T, n_fft)
        rms = frames.square().mean(dim=2).sqrt()  # (B, T)
        mag = power.sqrt()  # (B, F, T)
        centroid = (self.freqs[None, :, None] * mag).sum(1) / mag.sum(1).clamp(min=1e-10)  # (B, T)
        return mfcc, rms, centroid


@dataclass(frozen=True, slots=True)
class PreparedAudio:
    samples: F32  # (N,) mono at the route's sample rate


class AudioProcessor:
    """MFCC ``(n_mfcc, T)`` plus loudness/VAD/centroid per audio chunk.

    ``backend = "torch"`` runs a whole batch through :class:`TorchMFCC` (one
    STFT per group of equal-length chunks, on CPU or CUDA); ``"librosa"`` is
    the per-chunk reference.
    """

    modality: Modality = "audio"
    vocabulary: AudioVocabulary = AUDIO

    def __init__(self, params: AudioParams, device: str = "cpu") -> None:
        self.params = params
        self.device = resolve_device(device)
        p = params
        self.torch_mfcc = TorchMFCC(p.sample_rate, p.n_mfcc, p.n_fft, p.hop_length, p.n_mels).to(self.device)

    def prepare(self, event: InputEvent) -> PreparedAudio:
        samples, rate = decode_audio(event.payload, event.content_type)
        p = self.params
        return PreparedAudio(to_mono(samples, rate, p.sample_rate, p.max_seconds))

    def run(self, items: Sequence[PreparedAudio]) -> list[Features]:
        if self.params.backend == "torch":
            return self._run_torch(items)
        p = self.params
        out = []
        for it in items:
            m = mfcc(
                it.samples, p.sample_rate, p.n_mfcc, n_fft=p.n_fft, hop_length=p.hop_length, n_mels=p.n_mels
            )
            stats = loudness(it.samples, p.sample_rate, p)
            out.append(Features("audio", frames=m, stats=stats, vocabulary=self.vocabulary))
        return out

    @torch.inference_mode()
    def _run_torch(self, items: Sequence[PreparedAudio]) -> list[Features]:
        out: list[Features | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, it in enumerate(items):  # equal lengths batch without padding
            groups.setdefault(len(it.samples), []).append(i)
        vad_db = self.params.vad_threshold_db
        for idx in groups.values():
            x = torch.from_numpy(np.stack([items[i].samples for i in idx]))  # (B, N)
            mfccs, rms, centroid = self.torch_mfcc(to_device(x, self.device))
            loud = 10 * torch.log10(x.square().mean(dim=1) + _EPS)  # (B,) dBFS of the whole chunk
            voiced = (20 * torch.log10(rms + _EPS) > vad_db).float().mean(dim=1)  # (B,)
            m_np = mfccs.float().cpu().numpy()
            v_np, c_np = voiced.cpu().numpy(), centroid.mean(dim=1).cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = Features(
                    "audio",
                    frames=m_np[j],
                    stats={
                        "loudness_dbfs": float(loud[j]),
                        "voice_ratio": float(v_np[j]),
                        "centroid_hz": float(c_np[j]),
                    },
                    vocabulary=self.vocabulary,
                )
        return [f for f in out if f is not None]


def create(params: AudioParams, modality: Modality, device: str, dtype: str) -> AudioProcessor:
    # The STFT stays float32 whatever the route says: half precision costs
    # MFCC accuracy for no gain on chunks this small.
    return AudioProcessor(params, device)
