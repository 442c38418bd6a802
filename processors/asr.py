"""Speech to text on utterances: pocketsphinx (offline, shipped) or Whisper.

Each audio chunk goes through Silero VAD and the per-source
:class:`~processors.utterances.Segmenter`; the chunk that closes an
utterance carries its transcript (``Features.text``) and the utterance's
start and end in event time (``stats``), so the transcript lands in that
chunk's window and the prompt says when in it the words were heard. Every
other chunk carries nothing. The utterances a batch closes are transcribed
together (Whisper batches them; pocketsphinx reads them one by one).

- ``pocketsphinx``: the US-English acoustic model, dictionary and language
  model inside the ``pocketsphinx`` wheel: real words, no download, CPU, in
  a worker process of its own (:mod:`processors.sphinx`: it holds the GIL).
- ``whisper``: any Whisper checkpoint through transformers, from a local
  directory or an id already in the HF cache (never downloaded), on the
  route's device.

Chunks of a source must reach :meth:`ASRProcessor.run` in order: keep the
route at ``workers = 1`` (the default).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from engine.contracts.errors import ConfigError
from engine.contracts.types import Features, InputEvent, Modality
from processors.devices import resolve_device, resolve_dtype
from processors.params import ASRParams
from processors.sphinx import Pocketsphinx
from processors.utterances import F32, RATE, Segmenter, Utterance
from processors.vad import PreparedChunk, SileroVAD, prepare_chunk
from processors.vocabulary import ASR, ASRVocabulary


class Recogniser(Protocol):
    def transcribe(self, utterances: Sequence[F32]) -> list[str]: ...


class Whisper:
    """A Whisper checkpoint (local directory or HF-cache id), batched."""

    def __init__(self, params: ASRParams, device: str, dtype: str) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        if not params.model:
            raise ConfigError(["asr backend = 'whisper' needs params.model (a directory or a cached id)"])
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            self.processor: Any = WhisperProcessor.from_pretrained(params.model, local_files_only=True)
            model = WhisperForConditionalGeneration.from_pretrained(params.model, local_files_only=True)
        except OSError as exc:
            where = "directory" if Path(params.model).exists() else "HF cache"
            problem = f"asr params.model = {params.model!r}: no Whisper in that {where}: {exc}"
            raise ConfigError([problem]) from exc
        self.model: Any = model.to(self.device, self.dtype).eval()  # type: ignore[arg-type]
        self.language = params.language or None
        #: Words per utterance: 128 tokens, within what the decoder can place.
        self.max_new_tokens = min(128, int(model.config.max_target_positions) // 2)

    def transcribe(self, utterances: Sequence[F32]) -> list[str]:
        import torch

        if not utterances:
            return []
        inputs = self.processor(list(utterances), sampling_rate=RATE, return_tensors="pt")
        features = inputs.input_features.to(self.device, self.dtype)
        kwargs: dict[str, Any] = {"language": self.language} if self.language else {}
        with torch.inference_mode():
            ids = self.model.generate(features, max_new_tokens=self.max_new_tokens, **kwargs)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]


class ASRProcessor:
    """Transcripts of utterances, on the chunk that closes each (see the module)."""

    modality: Modality = "audio"
    vocabulary: ASRVocabulary = ASR

    def __init__(self, params: ASRParams, recogniser: Recogniser) -> None:
        self.params = params
        self.recogniser = recogniser
        self.vad = SileroVAD(params.max_sources)
        self.segmenter = Segmenter(params)
        self._lock = threading.Lock()

    def prepare(self, event: InputEvent) -> PreparedChunk:
        return prepare_chunk(event, self.params.max_seconds)

    def run(self, items: Sequence[PreparedChunk]) -> list[Features]:
        closed: list[tuple[int, Utterance]] = []
        with self._lock:  # the segmenter and the recogniser hold per-source state
            for i, it in enumerate(items):
                speech = self.vad.probabilities(it.source, it.samples) >= self.params.threshold
                closed.extend((i, u) for u in self.segmenter.push(it.source, it.ts_ns, it.samples, speech))
            texts = self.recogniser.transcribe([u.samples for _, u in closed])
        out = [Features("audio", vocabulary=self.vocabulary) for _ in items]
        for (i, u), text in zip(closed, texts, strict=True):
            if not text:
                continue
            stats = {"heard_start_ms": u.start_ns / 1e6, "heard_end_ms": u.end_ns / 1e6}
            before = out[i]
            if before.text:  # one chunk closed two (after a gap): one transcript spanning both
                stats["heard_start_ms"] = before.stats["heard_start_ms"]
                text = f"{before.text} {text}"
            out[i] = Features("audio", text=text, stats=stats, vocabulary=self.vocabulary)
        return out


def create(params: ASRParams, modality: Modality, device: str, dtype: str) -> ASRProcessor:
    recogniser: Recogniser = (
        Pocketsphinx() if params.backend == "pocketsphinx" else Whisper(params, device, dtype)
    )
    return ASRProcessor(params, recogniser)
