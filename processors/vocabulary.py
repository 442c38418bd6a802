"""What the built-in processors' features mean: how they fuse, read and change.

Kept apart from the processors (like :mod:`processors.params`) so that reading
a result, replaying one or testing the aligner never imports torch, OpenCV or
librosa. Each processor puts its vocabulary on every
:class:`~engine.contracts.types.Features` it makes; ``passthrough`` uses the
engine's default one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from engine.contracts.types import Features, FusedFeatures, ModalityFusion
from engine.contracts.vocabulary import FeatureVocabulary, embedding_change, stat, text_change

#: A loudness step this large (dB) reads as a new scene.
LOUDNESS_SCALE_DB = 20.0


@dataclass(frozen=True, slots=True)
class ImageVocabulary(FeatureVocabulary):
    """``cnn``: CNN embedding, brightness, hue histogram, faces, motion, ImageNet labels.

    The prompt leaves out the hue histogram (four numbers that read as noise);
    a change is the embedding's cosine distance, or a different face count.
    """

    hidden: ClassVar[frozenset[str]] = frozenset({"hue_red", "hue_green", "hue_cyan", "hue_blue"})

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        score = embedding_change(
            before.embedding if before is not None else None, now.embedding if now is not None else None
        )
        faces, was = stat(now, "faces"), stat(before, "faces")
        if faces is not None and was is not None and round(faces) != round(was):
            score = max(score, 1.0)
        return score

    def describe(self, fusion: ModalityFusion) -> str:
        """Words only: the face count and the labels (numbers stay in the JSON)."""
        words = []
        labels = fusion.summary.get("labels")
        if isinstance(labels, list) and labels:
            words.append("Looks like: " + ", ".join(str(x) for x in labels[:3]) + ".")
        faces = stat(fusion, "faces")
        if faces is not None:
            words.append(f"Faces: {round(faces)}.")
        return " ".join(words)


@dataclass(frozen=True, slots=True)
class AudioVocabulary(FeatureVocabulary):
    """``mfcc``: MFCC mean and spread per coefficient, loudness, voice share, centroid.

    A change is a loudness step, :data:`LOUDNESS_SCALE_DB` being a whole new scene.
    """

    frames: ClassVar[tuple[str, str]] = ("mfcc_mean", "mfcc_std")

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        loud, was = stat(now, "loudness_dbfs"), stat(before, "loudness_dbfs")
        if loud is None or was is None:
            return 0.0
        return min(1.0, abs(loud - was) / LOUDNESS_SCALE_DB)

    def describe(self, fusion: ModalityFusion) -> str:
        loud = stat(fusion, "loudness_dbfs")
        return "" if loud is None else f"Audio: {loudness_word(loud)}."


@dataclass(frozen=True, slots=True)
class TextVocabulary(FeatureVocabulary):
    """``minilm``: the texts, their sentence embedding and sizes.

    A change is new text (paraphrases count: the GLM should read them).
    """

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        return text_change(before, now)


def loudness_word(dbfs: float) -> str:
    """A loudness as people say it (RMS dBFS of the window's chunks)."""
    for floor, word in ((-20.0, "loud"), (-35.0, "moderate"), (-55.0, "quiet")):
        if dbfs >= floor:
            return word
    return "silent"


def quoted(text: str, limit: int = 200) -> str:
    """``text`` in double quotes, cut at ``limit`` characters."""
    text = " ".join(text.split())
    return f'"{text[:limit]}{"…" if len(text) > limit else ""}"'


def seconds(at_ms: float, start_ns: int) -> str:
    """An event time (epoch ms) as seconds from the window's start, 0.1 s steps."""
    return f"{(at_ms - start_ns / 1e6) / 1000:.1f}"


@dataclass(frozen=True, slots=True)
class VADVocabulary(FeatureVocabulary):
    """``vad``: Silero speech probability per chunk (``speech_prob``, its window
    mean) and whether it was speech (``speech``: the window's speech share).

    A change is speech starting or stopping: the step in the speech share.
    """

    def describe(self, fusion: ModalityFusion) -> str:
        share = stat(fusion, "speech")
        if share is None:
            return ""
        return f"Speech {round(share * 100)} % of the time." if share > 0 else "No speech."

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        share, was = stat(now, "speech"), stat(before, "speech")
        if share is None or was is None:
            return 0.0
        return min(1.0, abs(share - was))


@dataclass(frozen=True, slots=True)
class ASRVocabulary(FeatureVocabulary):
    """``asr``: transcripts. Each carries its utterance's start and end
    (``stats["heard_start_ms"/"heard_end_ms"]``, event time in ms since the epoch).

    Fused: ``heard`` (the transcripts, in time order), ``heard_start_ms`` and
    ``heard_end_ms`` (lists, one per transcript). A prompt reads
    ``Heard (0.2–1.9 s): "..."``, seconds from the window's start (negative:
    the utterance began in an earlier window). A change is a new transcript.
    """

    def fuse(self, features: Sequence[Features]) -> FusedFeatures:
        said = [f for f in features if f.text]
        if not said:
            return FusedFeatures({})
        return FusedFeatures(
            {
                "heard": [str(f.text) for f in said],
                "heard_start_ms": [float(f.stats["heard_start_ms"]) for f in said],
                "heard_end_ms": [float(f.stats["heard_end_ms"]) for f in said],
            }
        )

    def describe(self, fusion: ModalityFusion) -> str:
        s: Mapping[str, object] = fusion.summary
        heard, starts, ends = s.get("heard"), s.get("heard_start_ms"), s.get("heard_end_ms")
        if not (isinstance(heard, list) and isinstance(starts, list) and isinstance(ends, list)):
            return ""
        return " ".join(
            f"Heard ({seconds(a, fusion.start_ns)}–{seconds(b, fusion.start_ns)} s): {quoted(str(t))}."
            for t, a, b in zip(heard, starts, ends, strict=False)
        )

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        return new_words(before, now, "heard")


@dataclass(frozen=True, slots=True)
class OCRVocabulary(FeatureVocabulary):
    """``ocr``: the text lines read in a frame (``Features.labels``).

    Fused: ``seen``, every line of the window once, first seen first (a sign
    read in three frames is one line). A change is a line not seen before.
    """

    def fuse(self, features: Sequence[Features]) -> FusedFeatures:
        lines = list(dict.fromkeys(line for f in features for line in f.labels))
        return FusedFeatures({"seen": lines} if lines else {})

    def describe(self, fusion: ModalityFusion) -> str:
        seen = fusion.summary.get("seen")
        if not isinstance(seen, list) or not seen:
            return ""
        return "Text seen: " + ", ".join(quoted(str(x)) for x in seen) + "."

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        return new_words(before, now, "seen")


@dataclass(frozen=True, slots=True)
class DetectVocabulary(FeatureVocabulary):
    """``detect``: the objects in a frame (``Features.labels``, with repeats).

    Fused: ``objects`` (each label once, first seen first) and
    ``object_counts`` (the most of it in any one frame of the window). A
    prompt reads ``Objects: person ×2, forklift.``; a change is a new kind of object.
    """

    def fuse(self, features: Sequence[Features]) -> FusedFeatures:
        most: dict[str, int] = {}
        for f in features:
            for label in dict.fromkeys(f.labels):
                most[label] = max(most.get(label, 0), sum(1 for x in f.labels if x == label))
        if not most:
            return FusedFeatures({})
        return FusedFeatures({"objects": list(most), "object_counts": [float(n) for n in most.values()]})

    def describe(self, fusion: ModalityFusion) -> str:
        objects, counts = fusion.summary.get("objects"), fusion.summary.get("object_counts")
        if not isinstance(objects, list) or not isinstance(counts, list) or not objects:
            return ""
        named = [f"{o} ×{int(n)}" if n > 1 else str(o) for o, n in zip(objects, counts, strict=False)]
        return "Objects: " + ", ".join(named) + "."

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        return new_words(before, now, "objects")


def new_words(before: ModalityFusion | None, now: ModalityFusion | None, key: str) -> float:
    """1 when ``now``'s ``key`` list holds a string ``before``'s does not."""
    words = now.summary.get(key) if now is not None else None
    if not isinstance(words, list) or not words:
        return 0.0
    was = before.summary.get(key) if before is not None else None
    known = set(was) if isinstance(was, list) else set()
    return 1.0 if any(w not in known for w in words) else 0.0


IMAGE = ImageVocabulary()
AUDIO = AudioVocabulary()
TEXT = TextVocabulary()
VAD = VADVocabulary()
ASR = ASRVocabulary()
OCR = OCRVocabulary()
DETECT = DetectVocabulary()


def sound_meter(audio: Mapping[str, Any]) -> tuple[float, float] | None:
    """(loudness in dBFS, share of voice 0..1) of an ``mfcc`` route's fused
    summary (a result's ``features.audio``), for a level meter such as the
    monitor's sound strip; ``None`` when the route is not ``mfcc``."""
    loud = audio.get("loudness_dbfs")
    if not isinstance(loud, int | float):
        return None
    voice = audio.get("voice_ratio")
    return float(loud), float(voice) if isinstance(voice, int | float) else 0.0
