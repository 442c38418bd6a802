"""The records the engine publishes, typed: a window's :class:`Result` and an
event's :class:`Rejection`. The AsyncAPI document's payload schemas are
generated from these models (``engine/wire/asyncapi.py``), so what the docs
promise and what the engine sends have one definition.

The result identity is ``<source>:<window start_ns>:<digest>``, the digest a
sha256 over the window's event ids (fused and skipped). The results stream
deduplicates on it (``Nats-Msg-Id``): the same window rebuilt with the same
events after a crash is stored once, while a window that receives more events
after it was published (a source evicted and back, a restart) gets a new id,
so its second *part* is stored too instead of being dropped as a duplicate.
Consumers merge parts of one window by ``(source, window.start_ns)``.

Results are on the hot path. The engine builds them from values its own types
already guarantee, so :meth:`FrameRecord.from_frame` and :meth:`FrameRecord.result`
construct without validation (like ``model_construct``, minus its per-field
pass), nested parts are plain ``TypedDict`` values (frozen is shallow: nobody
mutates them), and ``to_bytes()`` is one ``orjson.dumps`` of the fields: the
same bytes the engine sent when records were dicts, at about 2 µs more per
result (benchmarks/records.py). A :class:`Rejection` is validated when built
(rarer, and its fields come from a message that failed checks). Anything read
from outside validates with ``model_validate``/``model_validate_json``.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal, NotRequired, Self, TypeAlias

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, with_config
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

from engine.contracts.errors import REASONS
from engine.contracts.types import FusedFrame, Modality

#: Why an event of a window was counted but not fused.
SkipReason: TypeAlias = Literal["rate_limited", "stale", "missing_dropped", "unmatched", "fuse_error"]
#: Why a frame was published without a model call.
GlmSkip: TypeAlias = Literal["no_change", "glm_overloaded", "breaker_open", "shutdown"]
#: The configured GLM backend (``glm.backend``).
GlmBackend: TypeAlias = Literal["none", "transformers", "hf", "openai", "vllm"]
#: A DLQ reason code (engine/contracts/errors.py).
Reason: TypeAlias = Literal[tuple(sorted(REASONS))]  # type: ignore[valid-type]
#: One value of a modality's feature summary: ``count`` and ``embedding_dim``
#: (int), means of the processor's stats (float), ``mfcc_mean``/``mfcc_std``
#: (floats), ``texts``/``labels`` (strings).
FeatureValue: TypeAlias = int | float | list[float] | list[str]

_STRICT = ConfigDict(extra="forbid")


@with_config(_STRICT)
class Window(TypedDict):
    start_ns: Annotated[int, Field(description="Window start, ns since the Unix epoch (event time)")]
    end_ns: Annotated[int, Field(description="Window end, ns since the Unix epoch (event time)")]


@with_config(_STRICT)
class ModelInfo(TypedDict):
    """The model that made a modality's features in this window."""

    processor: Annotated[str, Field(description="The route's processor (routing.toml's processor)")]
    model: Annotated[str, Field(description="The model it loaded, e.g. mobilenet_v3_small")]
    version: Annotated[
        str,
        Field(
            description="sha256: and 12 hex digits of the weight files' bytes (of the parameters when "
            "the model has no weight file); empty when unknown"
        ),
    ]
    variant: NotRequired[Annotated[str, Field(description="The route's A/B variant; absent without one")]]


@with_config(_STRICT)
class GlmAnswered(TypedDict):
    """The model answered (``answer`` holds it)."""

    backend: GlmBackend
    model: str
    latency_ms: Annotated[float, Field(description="The call, ms (a batch's calls share it)")]


@with_config(_STRICT)
class GlmFailed(TypedDict):
    """The call failed or timed out (``answer`` is null)."""

    backend: GlmBackend
    model: str
    latency_ms: float
    error: str


@with_config(_STRICT)
class GlmSkipped(TypedDict):
    """No call: the trigger saw no change (``score``), the queue was full, the
    breaker was open, or the engine was shutting down."""

    backend: GlmBackend
    skipped: GlmSkip
    score: NotRequired[Annotated[float, Field(description="on_change's change score, 0..1")]]


@with_config(_STRICT)
class GlmNotCalled(TypedDict):
    """No call by design: ``backend = "none"``, or the window held only skipped events."""

    backend: GlmBackend


Glm: TypeAlias = GlmAnswered | GlmFailed | GlmSkipped | GlmNotCalled


@with_config(_STRICT)
class Latency(TypedDict):
    """Where a result's time went, in milliseconds."""

    process: Annotated[float, Field(description="Slowest event's decode + model")]
    align: Annotated[float, Field(description="First arrival to window close")]
    glm: Annotated[float, Field(description="The model call (0 without one)")]
    event_to_result: Annotated[float, Field(description="Newest event's timestamp to publish")]


def trace_id_of(frame: FusedFrame) -> str:
    """The producer's W3C trace id, or one derived from the window (stable
    across a rebuild of the same window, unlike a random one)."""
    if frame.traceparent:
        return frame.traceparent.split("-")[1]
    return hashlib.sha256(f"{frame.source}:{frame.start_ns}".encode()).hexdigest()[:32]


def event_ids(frame: FusedFrame) -> list[str]:
    """Every event a result accounts for: fused, then skipped."""
    ids = [eid for f in frame.modalities.values() for eid in f.event_ids]
    for group in frame.skipped.values():
        ids.extend(group)
    return ids


def result_id(frame: FusedFrame) -> str:
    """``<source>:<start_ns>`` (nearest mode: ``<source>:<pivot ts>:<pivot id>``),
    then ``:`` and 32 hex digits of the sha256 of the sorted event ids."""
    digest = hashlib.sha256("\n".join(sorted(event_ids(frame))).encode()).hexdigest()[:32]
    return f"{frame.key or f'{frame.source}:{frame.start_ns}'}:{digest}"


def _frame_fields(frame: FusedFrame) -> dict[str, Any]:
    return {
        "result_id": result_id(frame),
        "source": frame.source,
        "window": {"start_ns": frame.start_ns, "end_ns": frame.end_ns},
        "events": {m: list(f.event_ids) for m, f in frame.modalities.items()},
        "missing": list(frame.missing),
        "features": {m: dict(f.summary) for m, f in frame.modalities.items()},
        "models": {m: f.model.wire for m, f in frame.modalities.items() if f.model is not None},
        "trace_id": trace_id_of(frame),
        "skipped": {why: list(ids) for why, ids in frame.skipped.items()} if frame.skipped else None,
    }


def frame_record(frame: FusedFrame) -> dict[str, Any]:
    """:meth:`FrameRecord.from_frame` as a plain dict: how the engine built it
    before records were typed, the reference the byte-equality tests and
    ``benchmarks/records.py`` compare against."""
    record = _frame_fields(frame)
    if record["skipped"] is None:
        del record["skipped"]
    return record


def _absent_not_null(schema: dict[str, Any]) -> None:
    """An optional field that is left out, never ``null``: not required, no null."""
    schema.pop("default", None)
    options = [s for s in schema.pop("anyOf") if s.get("type") != "null"]
    schema.update(options[0])


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def _trusted(cls, fields: dict[str, Any]) -> Self:
        """``model_construct`` without its per-field default pass (every field
        is given): about a microsecond instead of several, on the hot path.
        Only for values the engine's own types already guarantee."""
        record = cls.__new__(cls)
        object.__setattr__(record, "__dict__", fields)
        object.__setattr__(record, "__pydantic_fields_set__", set(fields))
        object.__setattr__(record, "__pydantic_extra__", None)
        object.__setattr__(record, "__pydantic_private__", None)
        return record

    def to_bytes(self) -> bytes:
        """The JSON on the wire: the fields in declaration order, ``skipped``
        left out when there is none. One ``orjson.dumps`` of plain values:
        byte for byte what the engine sent when records were dicts."""
        fields = self.__dict__
        if fields.get("skipped", 0) is None:
            fields = fields.copy()
            del fields["skipped"]
        return orjson.dumps(fields)


class _WindowFields(_Record):
    """What a result says about its window (shared by FrameRecord and Result)."""

    result_id: str = Field(
        description="<source>:<window start_ns>:<32 hex of sha256 over the sorted event ids>"
    )
    source: str
    window: Window
    events: dict[Modality, list[str]] = Field(description="Event ids per modality, in time order")
    missing: list[Modality] = Field(description="Configured modalities with no event in the window")
    features: dict[Modality, dict[str, FeatureValue]] = Field(description="Compact per-modality summary")
    models: dict[Modality, ModelInfo] = Field(
        default_factory=dict,
        description="Which model (and version, and A/B variant) made each modality's features; "
        "always sent (absent only in records of engines before it)",
    )
    trace_id: str = Field(description="W3C trace id: the producer's, or one derived from the window")
    skipped: dict[SkipReason, list[str]] | None = Field(
        None,
        description="Ids of this window's events counted but not fused; left out when none",
        exclude_if=lambda v: v is None,
        json_schema_extra=_absent_not_null,
    )

    @field_validator("skipped", mode="before")
    @classmethod
    def _never_null(cls, value: object) -> object:
        if value is None:  # the default (absent) is not validated: only an explicit null
            raise ValueError("left out when there is none, never null")
        return value


class FrameRecord(_WindowFields):
    """The deterministic part of a result: same events + same clock -> same bytes
    (what ``autoglm replay`` writes). The published result is :meth:`Result.of`."""

    @classmethod
    def from_frame(cls, frame: FusedFrame) -> Self:
        """The record of a closed window (trusted: built without validation)."""
        return cls._trusted(_frame_fields(frame))


class Result(_WindowFields):
    """One fused window (or one part of it), on ``<prefix>.out.<source>``;
    ``Nats-Msg-Id`` = ``result_id``. Parts of one window share ``source`` and
    ``window.start_ns``, hold disjoint events, and are merged by the consumer."""

    @classmethod
    def of(
        cls, frame: FusedFrame, *, prompt: str | None, answer: str | None, glm: Glm, latency_ms: Latency
    ) -> Result:
        """The published result of a closed window, in one step (the hot path;
        trusted: built without validation)."""
        fields = _frame_fields(frame)
        fields["prompt"], fields["answer"], fields["glm"], fields["latency_ms"] = (
            prompt,
            answer,
            glm,
            latency_ms,
        )
        return cls._trusted(fields)

    prompt: str | None = Field(
        description="null when no call was made and glm.include_prompt = false, or only skipped events"
    )
    answer: str | None = Field(description="null with backend none, on error, or when skipped")
    glm: Glm = Field(description="What the model stage did with this window")
    latency_ms: Latency


class Rejection(_Record):
    """One refused event, on ``<prefix>.dlq.<source>`` (``<prefix>.dlq._`` when the
    subject names no valid source), or ``<prefix>.late.<source>`` for ``too_late``
    with ``aligner.late_to = "late"``."""

    subject: str = Field(description="The input subject (bytes that are not UTF-8 escaped)")
    source: str | None = Field(description="null when the subject names no valid source")
    modality: Modality | None = Field(description="null when the subject names no valid modality")
    event_id: str | None = Field(description="Nats-Msg-Id, or the id the engine gave the event")
    timestamp_ns: str | None = Field(description="The AutoGLM-Timestamp header as sent (may be invalid)")
    reason: Reason
    message: str = Field(description="What was wrong, for people")
    rejected_ns: int = Field(description="Engine time of the rejection, ns since the Unix epoch")
