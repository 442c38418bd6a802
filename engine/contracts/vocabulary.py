"""The default feature vocabulary, and the pieces processors build theirs from.

A processor that says nothing about its features gets
:data:`DEFAULT_VOCABULARY`, which reads only the generic fields of
:class:`~engine.contracts.types.Features`:

- fuse: the mean embedding (``embedding_dim``, ``embedding_norm``), the mean
  of each named stat (sorted by name), the mean and standard deviation per row
  of the ``frames`` matrices over every time step of the window
  (``frames_mean``, ``frames_std``), the texts in time order (``texts``), the
  labels in first-seen order (``labels``, at most ten), the middle event's
  attachment;
- describe: the texts joined, else ``<count> event(s)`` then each stat, the
  first three ``frames_mean`` values and the labels;
- change: the embedding's cosine distance (1 when one frame has an embedding
  and the other has none), and 1 for new text.

Processors subclass :class:`FeatureVocabulary` to rename the frames, hide
keys from the prompt or add their own change rule (see
``processors/vocabulary.py``), or implement
:class:`~engine.contracts.types.Vocabulary` from scratch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from engine.contracts.types import Features, FloatArray, FusedFeatures, ModalityFusion, Vocabulary

#: Summary keys the default description never shows (they are for machines).
_UNSPOKEN = frozenset({"count", "embedding_dim", "embedding_norm"})
MAX_LABELS = 10


def rounded(x: float) -> float:
    """The precision every fused number is published with."""
    return round(float(x), 5)


def fmt(value: object) -> str:
    """A number as a prompt shows it: three significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def embedding_change(before: FloatArray | None, now: FloatArray | None) -> float:
    """Cosine distance, clipped to 0..1; 1 when only one of the two exists."""
    if (before is None) != (now is None):
        return 1.0
    if before is None or now is None:
        return 0.0
    if before.shape != now.shape:  # another model since (a reload): a new scene
        return 1.0
    denom = float(np.linalg.norm(before) * np.linalg.norm(now))
    cos = float(before @ now) / denom if denom > 0 else 1.0
    return min(1.0, max(0.0, 1.0 - cos))


def texts_of(fusion: ModalityFusion | None) -> tuple[str, ...]:
    if fusion is None:
        return ()
    texts = fusion.summary.get("texts")
    return tuple(str(t) for t in texts) if isinstance(texts, list) else ()


def text_change(before: ModalityFusion | None, now: ModalityFusion | None) -> float:
    """1 when ``now`` holds text other than ``before``'s, else 0."""
    texts = texts_of(now)
    return 1.0 if texts and texts != texts_of(before) else 0.0


def stat(fusion: ModalityFusion | None, key: str) -> float | None:
    """A numeric summary value, or ``None`` when absent."""
    value = fusion.summary.get(key) if fusion is not None else None
    return float(value) if isinstance(value, int | float) else None


@dataclass(frozen=True, slots=True)
class FeatureVocabulary:
    """The default reading of features (see the module docstring).

    Subclasses set :attr:`frames` and :attr:`hidden`, or override a method.
    Fusing one event takes a shorter path than fusing several (most windows
    hold one event per modality when windows are short); both give the same
    summary, which a test holds.
    """

    #: The summary keys of the per-row mean and standard deviation of ``frames``.
    frames: ClassVar[tuple[str, str]] = ("frames_mean", "frames_std")
    #: Summary keys the prompt leaves out.
    hidden: ClassVar[frozenset[str]] = frozenset()

    # -- fuse ---------------------------------------------------------------------------

    def fuse(self, features: Sequence[Features]) -> FusedFeatures:
        return self._fuse_one(features[0]) if len(features) == 1 else self._fuse_many(features)

    def _fuse_many(self, feats: Sequence[Features]) -> FusedFeatures:
        summary: dict[str, object] = {}
        embedding = None
        vecs = [f.embedding for f in feats if f.embedding is not None]
        # A processor whose embedding size varies (a bug, or a hostile plugin) must
        # not make the window unfusable: the first event's size wins, the others
        # are left out of the mean and counted.
        same = [v for v in vecs if v.shape == vecs[0].shape] if vecs else []
        if len(same) == 1:
            embedding = same[0]
        elif same:
            embedding = np.mean(np.stack(same), axis=0).astype(np.float32)
        if embedding is not None:
            summary["embedding_dim"] = int(embedding.shape[0])
            summary["embedding_norm"] = rounded(float(np.linalg.norm(embedding)))
        if len(same) < len(vecs):
            summary["embeddings_left_out"] = len(vecs) - len(same)
        for key in sorted({k for f in feats for k in f.stats}):
            vals = [f.stats[key] for f in feats if key in f.stats]
            summary[key] = rounded(sum(vals) / len(vals))  # plain Python: numpy costs more on a few values
        mats = [f.frames for f in feats if f.frames is not None and f.frames.size]
        mats = [m for m in mats if m.ndim == 2 and m.shape[0] == mats[0].shape[0]]  # rows must agree
        if mats:
            allf = np.concatenate(mats, axis=1)  # (rows, sum of T)
            summary[self.frames[0]] = [rounded(v) for v in allf.mean(axis=1)]
            summary[self.frames[1]] = [rounded(v) for v in allf.std(axis=1)]
        texts = [f.text for f in feats if f.text is not None]
        if texts:
            summary["texts"] = texts
        labels = list(dict.fromkeys(lbl for f in feats for lbl in f.labels))
        if labels:
            summary["labels"] = labels[:MAX_LABELS]
        shots = [f.attachment for f in feats if f.attachment is not None]
        return FusedFeatures(summary, embedding, shots[len(shots) // 2] if shots else None)

    def _fuse_one(self, f: Features) -> FusedFeatures:
        summary: dict[str, object] = {}
        if f.embedding is not None:
            summary["embedding_dim"] = int(f.embedding.shape[0])
            summary["embedding_norm"] = rounded(float(np.linalg.norm(f.embedding)))
        stats = f.stats
        for key in sorted(stats):
            summary[key] = rounded(stats[key])
        if f.frames is not None and f.frames.size:
            summary[self.frames[0]] = [rounded(v) for v in f.frames.mean(axis=1)]
            summary[self.frames[1]] = [rounded(v) for v in f.frames.std(axis=1)]
        if f.text is not None:
            summary["texts"] = [f.text]
        if f.labels:
            summary["labels"] = list(dict.fromkeys(f.labels))[:MAX_LABELS]
        return FusedFeatures(summary, f.embedding, f.attachment)

    # -- describe -----------------------------------------------------------------------

    def describe(self, fusion: ModalityFusion) -> str:
        s: Mapping[str, object] = fusion.summary
        texts = s.get("texts")
        if isinstance(texts, list):
            return " | ".join(str(t) for t in texts)
        mean, std = self.frames
        parts = [f"{s['count']} event(s)"]
        for key, value in s.items():
            if key in _UNSPOKEN or key in self.hidden or key == std:
                continue
            if isinstance(value, list):
                if key == mean:
                    parts.append(f"{key}[0:3]={[fmt(x) for x in value[:3]]}")
                elif key == "labels":
                    parts.append("labels=" + ", ".join(str(x) for x in value))
                continue
            parts.append(f"{key}={fmt(value)}")
        return ", ".join(parts)

    # -- change -------------------------------------------------------------------------

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        return max(
            embedding_change(
                before.embedding if before is not None else None, now.embedding if now is not None else None
            ),
            text_change(before, now),
        )


#: The reading of features whose processor gave none.
DEFAULT_VOCABULARY: Vocabulary = FeatureVocabulary()


def vocabulary_of(item: Features | ModalityFusion) -> Vocabulary:
    """The vocabulary ``item`` carries, or the default one."""
    return DEFAULT_VOCABULARY if item.vocabulary is None else item.vocabulary


@dataclass(frozen=True, slots=True)
class Ensemble:
    """The reading of features from a route that runs several processors on
    one event (``[[routes.also]]``): each event's :attr:`Features.parts` hold
    one processor's features each, ``vocabularies`` their readings, in order.

    - fuse: each processor's parts fused by its own vocabulary; the summaries
      are merged into one, in processor order (on a key two of them use, the
      first one's value stays: processors name their keys apart), the
      embedding and attachment are the first processor's;
    - describe: each vocabulary's words on the merged fusion, joined (each
      reads its own keys);
    - change: the largest of theirs.
    """

    vocabularies: tuple[Vocabulary | None, ...]

    def _each(self) -> list[Vocabulary]:
        return [DEFAULT_VOCABULARY if v is None else v for v in self.vocabularies]

    def fuse(self, features: Sequence[Features]) -> FusedFeatures:
        summary: dict[str, object] = {}
        embedding: FloatArray | None = None
        attachment: bytes | None = None
        for i, vocabulary in enumerate(self._each()):
            parts = [f.parts[i] for f in features if len(f.parts) > i]
            if not parts:
                continue
            fused = vocabulary.fuse(parts)
            if i == 0:
                embedding, attachment = fused.embedding, fused.attachment
            for key, value in fused.summary.items():
                summary.setdefault(key, value)
        return FusedFeatures(summary, embedding, attachment)

    def describe(self, fusion: ModalityFusion) -> str:
        return " ".join(words for v in self._each() if (words := v.describe(fusion)))

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        return max(v.change(before, now) for v in self._each())
