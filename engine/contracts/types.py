"""The contracts every stage shares, in one place.

Stages talk to each other only through these types: the wire codec makes
:class:`InputEvent` values, processors turn them into :class:`Features`, the
aligner fuses features into :class:`FusedFrame` values and the GLM stage reads
those. Timestamps are integer nanoseconds since the Unix epoch everywhere.

What the features *mean* belongs to the processor that made them: each
:class:`Features` carries the processor's :class:`Vocabulary`, the fused
:class:`ModalityFusion` carries it on, and the aligner, the prompt builder
and the change trigger ask it (see :mod:`engine.contracts.vocabulary`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

Modality = Literal["image", "audio", "text"]
MODALITIES: tuple[Modality, ...] = ("image", "audio", "text")

#: Nanoseconds since the Unix epoch (event time or engine time).
Nanos = int
#: A clock returning :data:`Nanos`; injected so tests can move time by hand.
Clock = Callable[[], Nanos]

FloatArray = npt.NDArray[np.float32]
#: Scalar descriptors a processor attaches to one event (brightness, loudness...).
Stats = Mapping[str, float]


@dataclass(frozen=True, slots=True)
class ContentType:
    """A parsed ``Content-Type`` header: ``type/subtype;key=value;...``."""

    mime: str
    params: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = "".join(f";{k}={v}" for k, v in self.params.items())
        return f"{self.mime}{extra}"


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """Which model made a feature: the processor, its model, and a version that
    is the content hash of the weights (of the parameters, for a model with no
    weight file), made once when the route loads it
    (:mod:`engine.contracts.versions`). ``variant`` names the route's A/B
    variant (empty when the route has none)."""

    processor: str
    model: str
    version: str
    variant: str = ""
    #: What a result publishes under ``models.<modality>``: built once here, shared
    #: by every result (nobody mutates it), so the hot path builds no dict.
    wire: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        wire = {"processor": self.processor, "model": self.model, "version": self.version}
        if self.variant:
            wire["variant"] = self.variant
        object.__setattr__(self, "wire", wire)


@dataclass(frozen=True, slots=True)
class InputEvent:
    """One timestamped sensor/media event as it arrived on NATS.

    ``payload`` is the raw body (no envelope). ``ts_ns`` is the producer's
    ``AutoGLM-Timestamp``; ``event_id`` is ``Nats-Msg-Id`` when the producer
    set one, otherwise an id the engine made up (``generated_id`` is then true
    and the id takes no part in duplicate detection).
    """

    subject: str
    source: str
    modality: Modality
    ts_ns: Nanos
    content_type: ContentType
    payload: bytes
    event_id: str
    generated_id: bool = False
    seq: int | None = None
    traceparent: str | None = None
    received_ns: Nanos = 0
    #: The id the transport gave this delivery (JetStream: ``js<stream seq>``),
    #: the same on every redelivery: a second DLQ record of it is deduplicated.
    delivery: str | None = None


@dataclass(frozen=True, slots=True)
class Features:
    """What a processor extracted from one event.

    ``embedding`` is a 1-D vector ``(D,)`` (CNN pooled features, sentence
    embedding); ``frames`` is a 2-D per-time-step matrix such as MFCCs
    ``(n_mfcc, T)``; ``stats`` holds named scalar descriptors; ``text`` the
    normalised text for the text modality.
    """

    modality: Modality
    embedding: FloatArray | None = None
    frames: FloatArray | None = None
    stats: Stats = field(default_factory=dict)
    text: str | None = None
    labels: Sequence[str] = ()
    #: A small JPEG of the frame, when the image route keeps one for the GLM.
    attachment: bytes | None = None
    #: How these features fuse, read in a prompt and change; ``None``: the
    #: default reading (:data:`engine.contracts.vocabulary.DEFAULT_VOCABULARY`).
    vocabulary: Vocabulary | None = field(default=None, compare=False)
    #: The model that made them; the route sets it (processors need not).
    model: ModelVersion | None = field(default=None, compare=False)
    #: A route running several processors on one event: each one's features,
    #: the route's own processor first (whose fields are also the ones above);
    #: their vocabulary is an :class:`engine.contracts.vocabulary.Ensemble`.
    parts: tuple[Features, ...] = ()


class FusedFeatures(NamedTuple):
    """A :class:`Vocabulary`'s fusion of one modality's features in a window.

    ``summary`` is what the result record publishes under ``features.<modality>``
    after ``count`` (which the aligner adds), in this order. (A named tuple:
    built once per window and modality, where a frozen dataclass costs 2x.)
    """

    summary: dict[str, object]
    embedding: FloatArray | None = None
    attachment: bytes | None = None


@dataclass(frozen=True, slots=True)
class ModalityFusion:
    """All events of one modality inside one fused frame, and their aggregate."""

    event_ids: tuple[str, ...]
    timestamps: tuple[Nanos, ...]
    summary: Mapping[str, object]
    embedding: FloatArray | None = None
    #: Each event's own descriptors, in time order (the summary holds means).
    per_event: tuple[Stats, ...] = ()
    #: The window's key frame (middle one) as JPEG, when the route keeps them.
    attachment: bytes | None = None
    #: Per event, in the order of ``event_ids``: engine-clock arrival and
    #: features-ready times, and the producer's ``traceparent`` (for tracing).
    arrivals: tuple[Nanos, ...] = ()
    done: tuple[Nanos, ...] = ()
    traceparents: tuple[str | None, ...] = ()
    #: The vocabulary that fused it (``None``: the default one).
    vocabulary: Vocabulary | None = field(default=None, compare=False)
    #: The model of its newest event (``None``: not known, a frame built by hand).
    model: ModelVersion | None = field(default=None, compare=False)
    #: The start of the window it was fused in: a vocabulary that speaks of
    #: times (when an utterance was heard) says them from there.
    start_ns: Nanos = 0


@dataclass(frozen=True, slots=True)
class FusedFrame:
    """The aligner's output: one source's events in one window of event time."""

    source: str
    start_ns: Nanos
    end_ns: Nanos
    modalities: Mapping[Modality, ModalityFusion]
    missing: tuple[Modality, ...]
    traceparent: str | None
    #: Engine-clock time the frame's first event arrived and the frame closed.
    first_arrival_ns: Nanos
    closed_ns: Nanos
    #: Largest per-event processing time in the frame (decode + model), ns.
    process_ns: Nanos = 0
    #: The result's ``Nats-Msg-Id``; ``<source>:<start_ns>`` when empty.
    key: str = ""
    #: Events of this window that were counted but not fused, by why
    #: (``rate_limited``, ``stale``): listed so every event ends in one record.
    skipped: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


class Vocabulary(Protocol):
    """What a processor says about its features, so the core names none of them.

    A processor puts one on each :class:`Features` it makes. It must be
    immutable and compare equal to another that reads features the same way
    (a frozen dataclass does both): events of one modality in one window whose
    vocabularies differ (a hot reload swapped the processor) are fused by the
    default vocabulary instead, and the change trigger treats a swap as one
    processor's features leaving and another's arriving.
    """

    def fuse(self, features: Sequence[Features]) -> FusedFeatures:
        """Aggregate a window's features of one modality, in time order (at least one)."""
        ...

    def describe(self, fusion: ModalityFusion) -> str:
        """The words a prompt template's ``{image}``/``{audio}``/``{text}`` becomes."""
        ...

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        """How much this modality changed since the last frame sent to the GLM,
        0 (the same) .. 1 (new); ``None``: it was, or is, not in the frame.

        ``before`` keeps only its ``summary``, ``embedding`` and ``vocabulary``
        (the trigger remembers no per-event data or attachments)."""
        ...


T = TypeVar("T")


@runtime_checkable
class Processor(Protocol[T]):
    """A modality processor: a cheap per-event ``prepare`` and a batched ``run``.

    ``prepare`` validates and decodes one event and raises
    :class:`engine.contracts.errors.EventRejected` with a reason code for bad input, so
    one bad event never poisons a batch. ``run`` takes the prepared items of a
    whole batch and must return exactly one :class:`Features` per item, in
    order. Both are called from a worker thread, never on the event loop.
    Features that should fuse, read or trigger other than the default way
    carry the processor's :class:`Vocabulary`.

    Two optional attributes name what it loaded, for the model's version
    (:mod:`engine.contracts.versions`): ``model_name`` (``str``) and
    ``weight_files`` (paths); without them the processor's name and a hash
    of its parameters stand in.
    """

    modality: Modality

    def prepare(self, event: InputEvent) -> T: ...

    def run(self, items: Sequence[T]) -> list[Features]: ...
