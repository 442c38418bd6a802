"""Utterances: a source's audio gathered from where speech starts to the next pause.

Speech-to-text reads whole utterances, not 100 ms chunks: a recogniser given
a tenth of a second of a word hears nothing. :class:`Segmenter` keeps, per
source, the chunks since speech began (plus ``preroll_ms`` before it: onsets
are soft) and closes the utterance when ``pause_ms`` of non-speech follows
it, when it reaches ``max_utterance_ms``, or when the source's audio has a
gap longer than a pause. Which 32 ms frames are speech is Silero's call
(:class:`processors.vad.SileroVAD`); the segmenter only counts.

An utterance is returned by the chunk that closes it, so its transcript is
attributed to that chunk's window (docs/configuration.md, "Words"); it
carries its own start and end in event time.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from processors.params import ASRParams

F32 = npt.NDArray[np.float32]
RATE: Final = 16_000
#: One Silero frame: 512 samples at 16 kHz.
FRAME_NS: Final = 32_000_000


@dataclass(frozen=True, slots=True)
class Utterance:
    source: str
    #: Event time where its speech began and where its last speech ended
    #: (``samples`` also hold the pre-roll before and the pause after).
    start_ns: int
    end_ns: int
    samples: F32  # (N,) mono at 16 kHz


@dataclass(slots=True)
class _Source:
    #: Chunks held: before speech, the pre-roll; once it began, all since.
    chunks: deque[tuple[int, F32]] = field(default_factory=deque)
    speaking: bool = False
    #: Where speech began (the pre-roll before it is audio, not words), the
    #: non-speech since the last speech frame, and where that speech ended.
    speech_start_ns: int = 0
    silence_ns: int = 0
    speech_end_ns: int = 0
    #: Where the last chunk ended (a gap after it closes the utterance).
    end_ns: int = 0


def duration_ns(samples: F32) -> int:
    return len(samples) * 1_000_000_000 // RATE


class Segmenter:
    """Per source, speech chunks in, closed utterances out. Not thread-safe:
    the ``asr`` processor calls it under its lock, each source's chunks in order."""

    def __init__(self, params: ASRParams) -> None:
        self.pause_ns = params.pause_ms * 1_000_000
        self.max_ns = params.max_utterance_ms * 1_000_000
        self.preroll_ns = params.preroll_ms * 1_000_000
        self.max_sources = params.max_sources
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def push(self, source: str, ts_ns: int, samples: F32, speech: npt.NDArray[np.bool_]) -> list[Utterance]:
        """The chunk at ``ts_ns`` with its frames' speech flags; the utterances it closes
        (a gap before it can close one, and the chunk itself another)."""
        s = self._sources.pop(source, None) or _Source()
        self._sources[source] = s
        if len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        closed: list[Utterance] = []
        if s.chunks and ts_ns - s.end_ns > self.pause_ns:  # the source went quiet: a gap
            if s.speaking:
                closed.append(self._close(source, s, s.speech_end_ns))
            s.chunks.clear()  # a pre-roll from before the gap is not this speech's
        end = ts_ns + duration_ns(samples)
        s.end_ns = end
        s.chunks.append((ts_ns, samples))
        if speech.any():
            voiced = np.flatnonzero(speech)
            if not s.speaking:  # the frames are this chunk's, give or take the 32 ms carried over
                s.speech_start_ns = min(end, ts_ns + int(voiced[0]) * FRAME_NS)
            last = int(voiced[-1])  # frames after it are non-speech
            trailing = (len(speech) - 1 - last) * FRAME_NS
            s.speech_end_ns = end - trailing
            s.silence_ns = trailing
            s.speaking = True
        elif s.speaking:
            s.silence_ns += end - ts_ns
        if not s.speaking:
            while s.chunks and end - s.chunks[0][0] > self.preroll_ns + duration_ns(samples):
                s.chunks.popleft()  # keep only the pre-roll before this chunk
        elif s.silence_ns >= self.pause_ns:
            closed.append(self._close(source, s, s.speech_end_ns))
        elif end - s.chunks[0][0] >= self.max_ns:
            closed.append(self._close(source, s, end))
        return closed

    def _close(self, source: str, s: _Source, end_ns: int) -> Utterance:
        start = s.speech_start_ns
        audio = np.concatenate([c for _, c in s.chunks]) if s.chunks else np.zeros(0, np.float32)
        s.chunks.clear()
        s.speaking, s.silence_ns = False, 0
        return Utterance(source, start, max(start, end_ns), audio)
