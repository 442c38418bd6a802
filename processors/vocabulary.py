"""What the built-in processors' features mean: how they fuse, read and change.

Kept apart from the processors (like :mod:`processors.params`) so that reading
a result, replaying one or testing the aligner never imports torch, OpenCV or
librosa. Each processor puts its vocabulary on every
:class:`~engine.contracts.types.Features` it makes; ``passthrough`` uses the
engine's default one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.contracts.types import ModalityFusion
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


@dataclass(frozen=True, slots=True)
class TextVocabulary(FeatureVocabulary):
    """``minilm``: the texts, their sentence embedding and sizes.

    A change is new text (paraphrases count: the GLM should read them).
    """

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        return text_change(before, now)


IMAGE = ImageVocabulary()
AUDIO = AudioVocabulary()
TEXT = TextVocabulary()
