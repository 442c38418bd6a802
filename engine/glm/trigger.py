"""``trigger = "on_change"``: send a frame to the GLM only when it says something new.

A frame is sent when it differs enough from the last frame of its source that
was sent (``change_threshold``), or when ``max_interval_ms`` of event time has
passed since that one. How much a modality changed is its vocabulary's call
(its processor's: embedding distance, new text, a face count, a loudness
step); the frame's score is the largest over its modalities.

Pure: no clock, no I/O, the decision a function of the frames seen so far.
A source's snapshot can come from elsewhere (:meth:`ChangeTrigger.restore`:
another worker had the source, :mod:`engine.glm.memory`); it names its
vocabularies by :func:`vocabulary_key`, and the source's next frame binds
them back to the live ones (:func:`bind`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, is_dataclass, replace

from engine.contracts.types import MODALITIES, FusedFrame, Modality, ModalityFusion, Nanos, Vocabulary
from engine.contracts.vocabulary import DEFAULT_VOCABULARY, FeatureVocabulary, vocabulary_of

#: Sources whose last sent frame is remembered (least recently sent go first).
MAX_SOURCES = 10_000


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What on_change compares against: the last frame of a source sent to the model."""

    end_ns: Nanos
    modalities: Mapping[Modality, ModalityFusion]
    #: Read back from elsewhere: its vocabularies are :class:`Recalled` until bound.
    recalled: bool = False


@dataclass(frozen=True, slots=True)
class Recalled(FeatureVocabulary):
    """A vocabulary known only by its :func:`vocabulary_key` (a snapshot read back
    from another worker). Unbound, it reads as another processor's: a change."""

    key: str = ""

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        return 1.0


def vocabulary_key(vocabulary: Vocabulary | None) -> str:
    """What names a vocabulary across processes: its class, and its fields when
    it is a dataclass (equal vocabularies have equal keys)."""
    v = DEFAULT_VOCABULARY if vocabulary is None else vocabulary
    if isinstance(v, Recalled):
        return v.key
    name = f"{type(v).__module__}.{type(v).__qualname__}"
    return f"{name}{v!r}" if is_dataclass(v) else name


def bind(prev: Snapshot, frame: FusedFrame) -> Snapshot:
    """``prev`` (recalled) with each vocabulary that ``frame``'s modality names
    the same way replaced by the live one; the others stay :class:`Recalled`."""
    mods = dict(prev.modalities)
    for m, fused in prev.modalities.items():
        v = fused.vocabulary
        if not isinstance(v, Recalled):
            continue
        now = frame.modalities.get(m)
        if now is not None and vocabulary_key(now.vocabulary) == v.key:
            mods[m] = replace(fused, vocabulary=now.vocabulary)
        elif v.key == vocabulary_key(None):
            mods[m] = replace(fused, vocabulary=None)
    return Snapshot(prev.end_ns, mods)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Send the frame, or skip it (``why``) with the ``score`` that was too small."""

    send: bool
    score: float
    why: str | None = None


def snapshot(frame: FusedFrame) -> Snapshot:
    """``frame`` as the trigger remembers it: each modality's summary, embedding
    and vocabulary, none of its per-event data or attachment."""
    return Snapshot(
        frame.end_ns,
        {
            m: ModalityFusion((), (), f.summary, f.embedding, vocabulary=f.vocabulary)
            for m, f in frame.modalities.items()
        },
    )


def change_score(prev: Snapshot | None, cur: Snapshot | FusedFrame) -> float:
    """0 (same scene) .. 1 (new): the largest of the per-modality changes."""
    if prev is None:
        return 1.0
    score = 0.0
    for m in MODALITIES:
        before, now = prev.modalities.get(m), cur.modalities.get(m)
        if now is None:
            if before is None:
                continue
            s = vocabulary_of(before).change(before, None)
        elif before is None:
            s = vocabulary_of(now).change(None, now)
        else:
            old, new = vocabulary_of(before), vocabulary_of(now)
            if old is not new and old != new:  # another processor: one left, another came
                s = max(old.change(before, None), new.change(None, now))
            else:
                s = new.change(before, now)
        score = max(score, min(1.0, s))
    return score


class ChangeTrigger:
    """The on_change policy: one remembered :class:`Snapshot` per source, bounded."""

    def __init__(self, threshold: float, max_interval_ns: Nanos, max_sources: int = MAX_SOURCES) -> None:
        self.threshold = threshold
        self.max_interval_ns = max_interval_ns
        self.max_sources = max_sources
        self._last: OrderedDict[str, Snapshot] = OrderedDict()

    def adopt(self, old: ChangeTrigger) -> None:
        """Carry a replaced trigger's memory (hot reload): no source starts over."""
        self._last = old._last

    def forget(self, owns: Callable[[str], bool]) -> None:
        """Drop the sources ``owns`` picks (handed over to another worker)."""
        for source in [s for s in self._last if owns(s)]:
            del self._last[source]

    def snapshot_of(self, source: str) -> Snapshot | None:
        """The last frame of ``source`` sent (what another worker needs to go on)."""
        return self._last.get(source)

    def restore(self, source: str, snap: Snapshot) -> None:
        """Take ``source``'s snapshot from elsewhere, unless one was sent here since."""
        if source not in self._last:
            self._remember(source, snap)

    def decide(self, frame: FusedFrame) -> Verdict:
        """Send or skip ``frame``; a sent frame becomes its source's new reference."""
        prev = self._last.get(frame.source)
        if prev is not None and prev.recalled:
            prev = self._last[frame.source] = bind(prev, frame)
        score = change_score(prev, frame)
        due = prev is None or frame.end_ns - prev.end_ns >= self.max_interval_ns
        if score < self.threshold and not due:
            return Verdict(False, round(score, 4), "no_change")
        self._remember(frame.source, snapshot(frame))
        return Verdict(True, round(score, 4))

    def _remember(self, source: str, snap: Snapshot) -> None:
        self._last[source] = snap
        self._last.move_to_end(source)
        if len(self._last) > self.max_sources:
            self._last.popitem(last=False)

    def __len__(self) -> int:
        return len(self._last)
