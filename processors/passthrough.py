"""A processor with no model: the feature is the payload's byte count.

For benchmarks of the engine's own overhead and for tests of the plumbing.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.contracts.types import Features, InputEvent, Modality, Vocabulary
from engine.contracts.vocabulary import DEFAULT_VOCABULARY
from processors.params import PassthroughParams


class PassthroughProcessor:
    #: A byte count is a plain stat: the engine's default reading fits it.
    vocabulary: Vocabulary = DEFAULT_VOCABULARY

    def __init__(self, modality: Modality) -> None:
        self.modality: Modality = modality

    def prepare(self, event: InputEvent) -> int:
        return len(event.payload)

    def run(self, items: Sequence[int]) -> list[Features]:
        return [Features(self.modality, stats={"bytes": float(n)}, vocabulary=self.vocabulary) for n in items]


def create(params: PassthroughParams, modality: Modality, device: str, dtype: str) -> PassthroughProcessor:
    return PassthroughProcessor(modality)
