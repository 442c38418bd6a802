"""``trigger = "on_change"``: send a frame to the GLM only when it says something new.

A frame is sent when it differs enough from the last frame of its source that
was sent (``change_threshold``), or when ``max_interval_ms`` of event time has
passed since that one. How much a modality changed is its vocabulary's call
(its processor's: embedding distance, new text, a face count, a loudness
step); the frame's score is the largest over its modalities.

Pure: no clock, no I/O, the decision a function of the frames seen so far.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from engine.contracts.types import MODALITIES, FusedFrame, Modality, ModalityFusion, Nanos
from engine.contracts.vocabulary import vocabulary_of

#: Sources whose last sent frame is remembered (least recently sent go first).
MAX_SOURCES = 10_000


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What on_change compares against: the last frame of a source sent to the model."""

    end_ns: Nanos
    modalities: Mapping[Modality, ModalityFusion]


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

    def decide(self, frame: FusedFrame) -> Verdict:
        """Send or skip ``frame``; a sent frame becomes its source's new reference."""
        prev = self._last.get(frame.source)
        score = change_score(prev, frame)
        due = prev is None or frame.end_ns - prev.end_ns >= self.max_interval_ns
        if score < self.threshold and not due:
            return Verdict(False, round(score, 4), "no_change")
        self._last[frame.source] = snapshot(frame)
        self._last.move_to_end(frame.source)
        if len(self._last) > self.max_sources:
            self._last.popitem(last=False)
        return Verdict(True, round(score, 4))

    def __len__(self) -> int:
        return len(self._last)
