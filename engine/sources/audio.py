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

A run ends, and the next starts at its frame's own timestamp, when the
audio stops being one run: a frame whose time is off from where the samples
so far say it should be by more than :data:`RESYNC_NS` (a gap in a file, a
stalled live stream, a clock that drifted from the sample count), or a
change of sample rate or channels. What is buffered goes out first as a
shorter chunk, labelled with the rate it was recorded at.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from av.audio.resampler import AudioResampler

from engine.sources.producer import pcm_body

if TYPE_CHECKING:
    from av import AudioFrame


#: How far a frame's timestamp may be from the sample count's before the run restarts.
RESYNC_NS = 50_000_000


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
        if len(self._buf) and frame.sample_rate != self._rate:
            yield from self.flush()  # at the rate it was recorded at
        expected = self._origin + (self._emitted + len(self._buf)) * 1_000_000_000 // max(1, self._rate)
        samples = self._float_samples(frame)
        if len(self._buf) == 0 or self._buf.shape[1] != samples.shape[1] or abs(ts - expected) > RESYNC_NS:
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
