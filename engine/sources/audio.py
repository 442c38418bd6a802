"""Decoded audio frames into ``audio/pcm`` chunks of ``chunk_ms``.

FFmpeg decodes audio in frames of its codec's size (1024 samples for AAC,
1152 for MP3, whatever a device delivers); the engine wants chunks of a
fixed length. Frames are converted to interleaved float32 at the source's
own rate and channel layout (no resampling: the processor resamples if it
must) and cut into chunks of ``chunk_ms``. A chunk's timestamp is its first
sample's: the time of the frame that sample came in, plus the samples
before it, counted at the sample rate, so chunks of one run never drift from
the stream's clock by rounding. The last, shorter chunk goes out at the end
(:meth:`Chunker.flush`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from av.audio.resampler import AudioResampler

from engine.sources.producer import pcm_body

if TYPE_CHECKING:
    from av import AudioFrame


class Chunker:
    """Frames in (with their timestamps), ``(ts, body, content_type)`` chunks out."""

    def __init__(self, chunk_ms: int) -> None:
        self.chunk_ms = chunk_ms
        self._resampler: AudioResampler | None = None
        self._rate = 0
        self._buf: np.ndarray[Any, Any] = np.zeros((0, 1), np.float32)
        self._origin = 0  # ns of the first sample of the current run
        self._emitted = 0  # samples sent since _origin

    def _float_samples(self, frame: AudioFrame) -> np.ndarray[Any, Any]:
        if self._resampler is None or frame.sample_rate != self._rate:
            self._resampler = AudioResampler(format="flt", layout=frame.layout.name, rate=frame.sample_rate)
            self._rate = frame.sample_rate
        channels = frame.layout.nb_channels
        parts = [f.to_ndarray().reshape(-1, channels) for f in self._resampler.resample(frame)]
        return np.concatenate(parts) if parts else np.zeros((0, channels), np.float32)

    def add(self, frame: AudioFrame, ts: int) -> Iterator[tuple[int, bytes, str]]:
        """Take one decoded frame stamped ``ts`` (ns); yield every chunk it completes."""
        samples = self._float_samples(frame)
        if len(self._buf) == 0 or self._buf.shape[1] != samples.shape[1]:
            yield from self.flush()
            self._buf, self._origin, self._emitted = samples, ts, 0
        else:
            self._buf = np.concatenate([self._buf, samples])
        step = max(1, self._rate * self.chunk_ms // 1000)
        while len(self._buf) >= step:
            yield self._chunk(step)

    def flush(self) -> Iterator[tuple[int, bytes, str]]:
        """The rest, as one shorter chunk (end of a file, or of a pass of a loop)."""
        if len(self._buf):
            yield self._chunk(len(self._buf))

    def _chunk(self, n: int) -> tuple[int, bytes, str]:
        ts = self._origin + self._emitted * 1_000_000_000 // self._rate
        body, ct = pcm_body(self._buf[:n], self._rate)
        self._buf = self._buf[n:]
        self._emitted += n
        return ts, body, ct
