"""Voice activity: Silero VAD's speech probability per audio chunk.

The ``silero-vad`` wheel ships the model as ONNX; onnxruntime runs it on the
CPU (about a tenth of a millisecond per 32 ms frame), with no torch in the
loop and no download. Silero is recurrent: each stream (source) keeps its own
state, its last 64 samples of context and the samples left over after the
last whole 512-sample frame, so 100 ms chunks are read as one continuous
signal. :class:`SileroVAD` is that model, shared by the ``vad`` processor and
the ``asr`` processor's utterance segmenter.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from engine.contracts.errors import ConfigError
from engine.contracts.types import Features, InputEvent, Modality
from processors.audio import decode_audio, to_mono
from processors.params import VADParams
from processors.vocabulary import VAD, VADVocabulary

F32 = npt.NDArray[np.float32]

RATE: Final = 16_000
#: Samples Silero reads per step at 16 kHz (32 ms), and the context it keeps.
FRAME: Final = 512
CONTEXT: Final = 64


@dataclass(slots=True)
class _Stream:
    state: F32 = field(default_factory=lambda: np.zeros((2, 1, 128), np.float32))
    context: F32 = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))
    rest: F32 = field(default_factory=lambda: np.zeros(0, np.float32))
    #: The last frame's probability (what a chunk too short to finish a frame reads as).
    last: float = 0.0


def load_session() -> Any:
    """An onnxruntime session of the ONNX file inside the ``silero-vad`` wheel."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError(["processor vad/asr needs onnxruntime: pip install onnxruntime"]) from exc
    try:
        path = resources.files("silero_vad") / "data" / "silero_vad.onnx"
        model = path.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ConfigError(["processor vad/asr needs the silero-vad wheel: pip install silero-vad"]) from exc
    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1  # a frame is tiny: threads cost more than they give
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


class SileroVAD:
    """Speech probabilities of 32 ms frames, one recurrent state per stream.

    ``probabilities(stream, samples)`` takes the next mono 16 kHz samples of
    ``stream`` and returns one probability per whole frame they complete
    (a 100 ms chunk completes three, sometimes four). Thread-safe.
    """

    def __init__(self, max_streams: int = 10_000) -> None:
        self.session = load_session()
        self.max_streams = max_streams
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._lock = threading.Lock()
        self._sr = np.array(RATE, dtype=np.int64)

    def probabilities(self, stream: str, samples: F32) -> F32:
        with self._lock:
            s = self._streams.pop(stream, None) or _Stream()
            self._streams[stream] = s  # most recent last
            if len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)
            x = np.concatenate([s.rest, samples.astype(np.float32, copy=False)])
            n = len(x) // FRAME
            s.rest = x[n * FRAME :].copy()
            out = np.empty(n, np.float32)
            for i in range(n):
                frame = np.concatenate([s.context, x[i * FRAME : (i + 1) * FRAME]])
                prob, s.state = self.session.run(
                    None, {"input": frame[None, :], "state": s.state, "sr": self._sr}
                )
                out[i] = float(prob[0, 0])
                s.context = frame[-CONTEXT:]
            if n:
                s.last = float(out[-1])
            return out

    def last(self, stream: str) -> float:
        """The probability of ``stream``'s last whole frame (0 before its first)."""
        with self._lock:
            s = self._streams.get(stream)
            return s.last if s is not None else 0.0

    def reset(self, stream: str) -> None:
        with self._lock:
            self._streams.pop(stream, None)


@dataclass(frozen=True, slots=True)
class PreparedChunk:
    source: str
    ts_ns: int
    samples: F32  # (N,) mono at 16 kHz


def prepare_chunk(event: InputEvent, max_seconds: float) -> PreparedChunk:
    """Decode an audio event to mono 16 kHz (what Silero and the recognisers read)."""
    samples, rate = decode_audio(event.payload, event.content_type)
    return PreparedChunk(event.source, event.ts_ns, to_mono(samples, rate, RATE, max_seconds))


class VADProcessor:
    """``speech_prob``: the chunk's most speech-like frame; ``speech``: 1 when it
    reaches ``threshold``, else 0 (their window means are the speech share)."""

    modality: Modality = "audio"
    vocabulary: VADVocabulary = VAD

    def __init__(self, params: VADParams) -> None:
        self.params = params
        self.vad = SileroVAD(params.max_sources)

    def prepare(self, event: InputEvent) -> PreparedChunk:
        return prepare_chunk(event, self.params.max_seconds)

    def run(self, items: Sequence[PreparedChunk]) -> list[Features]:
        out = []
        for it in items:  # in order: each stream's state follows its chunks
            probs = self.vad.probabilities(it.source, it.samples)
            peak = float(probs.max()) if len(probs) else self.vad.last(it.source)  # a chunk < 32 ms
            stats = {"speech_prob": peak, "speech": float(peak >= self.params.threshold)}
            out.append(Features("audio", stats=stats, vocabulary=self.vocabulary))
        return out


def create(params: VADParams, modality: Modality, device: str, dtype: str) -> VADProcessor:
    # Silero is a CPU model (a recurrent net on 512 samples): CUDA would cost a
    # transfer per frame for nothing, whatever the route's device says.
    return VADProcessor(params)
