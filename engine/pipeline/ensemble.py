"""Several processors on one event: a route's own processor and its ``also`` ones.

The article's routing sends each modality to one processor (a CNN for images,
MFCCs for audio); words come from others on the same events (OCR on the
frames, voice activity and speech-to-text on the audio). :class:`Ensemble`
is one :class:`~engine.contracts.types.Processor` made of several, so the
router, batcher and aligner stay as they are: each event is prepared by
every member (a refusal by any refuses it), each batch runs through every
member in turn, and each event's features are the members' features side by
side (:attr:`Features.parts`), read by an
:class:`~engine.contracts.vocabulary.Ensemble` vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.contracts.types import Features, InputEvent, Modality, Processor
from engine.contracts.vocabulary import Ensemble as EnsembleVocabulary
from engine.pipeline.batcher import check_outputs


class Ensemble:
    """``members[0]`` is the route's processor: its features are the event's
    top-level ones (embedding, frames, attachment) and its ``max_fps`` the
    route's rate limit; the stats of all members are merged, the first
    member's value kept on a name two of them use."""

    def __init__(self, members: Sequence[Processor[Any]], names: Sequence[str]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one processor")
        self.members = tuple(members)
        self.names = tuple(names)
        self.modality: Modality = members[0].modality
        self.max_fps: object = getattr(members[0], "max_fps", None)
        self._vocabulary: EnsembleVocabulary | None = None

    def prepare(self, event: InputEvent) -> tuple[Any, ...]:
        return tuple(m.prepare(event) for m in self.members)

    def run(self, items: Sequence[tuple[Any, ...]]) -> list[Features]:
        each: list[list[Features]] = []
        for i, (member, name) in enumerate(zip(self.members, self.names, strict=True)):
            column = [it[i] for it in items]
            feats = member.run(column)
            check_outputs(column, feats, f"processor {name!r}")
            each.append(feats)
        return [self._join(tuple(f[j] for f in each)) for j in range(len(items))]

    def _join(self, parts: tuple[Features, ...]) -> Features:
        first = parts[0]
        stats: dict[str, float] = {}
        for part in parts:
            for key, value in part.stats.items():
                stats.setdefault(key, value)
        return Features(
            first.modality,
            embedding=first.embedding,
            frames=first.frames,
            stats=stats,
            text=first.text,
            labels=first.labels,
            attachment=first.attachment,
            vocabulary=self._vocabulary_of(parts),
            parts=parts,
        )

    def _vocabulary_of(self, parts: tuple[Features, ...]) -> EnsembleVocabulary:
        """One vocabulary object while the members' stay the same (the aligner
        compares vocabularies per event: identity is the cheap case)."""
        vocabularies = tuple(p.vocabulary for p in parts)
        known = self._vocabulary
        if known is None or known.vocabularies != vocabularies:
            known = self._vocabulary = EnsembleVocabulary(vocabularies)
        return known

    # -- what the engine reads of a route's processor ------------------------------------

    @property
    def model_name(self) -> object:
        """The route's own processor's model names the route's version."""
        return getattr(self.members[0], "model_name", None)

    @property
    def weight_files(self) -> object:
        return getattr(self.members[0], "weight_files", None)

    @property
    def device(self) -> object:
        return getattr(self.members[0], "device", "cpu")

    @property
    def dtype(self) -> object:
        return getattr(self.members[0], "dtype", "float32")

    @property
    def faults(self) -> dict[str, int]:
        return self._merged("faults")

    @property
    def counters(self) -> dict[str, int]:
        return self._merged("counters")

    def _merged(self, what: str) -> dict[str, int]:
        """Every member's figures by kind; an ``also`` member's kinds say whose."""
        out: dict[str, int] = {}
        for i, (member, name) in enumerate(zip(self.members, self.names, strict=True)):
            for kind, n in dict(getattr(member, what, {})).items():
                out[kind if i == 0 else f"{name}.{kind}"] = n
        return out
