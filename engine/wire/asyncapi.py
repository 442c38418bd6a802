"""The engine's message contract as an AsyncAPI document, from a FastStream app.

The engine reads and writes with nats-py on its hot path, so this app is not
what runs: it declares the same subjects and payload schemas for FastStream's
AsyncAPI generator. ``docs/asyncapi.json`` is generated from it (and a test
checks the committed file still matches)::

    .venv/bin/python -m engine.wire.asyncapi > docs/asyncapi.json
    .venv/bin/faststream docs gen engine.asyncapi:app      # the same, via FastStream's CLI
"""

from __future__ import annotations

from typing import Any, Literal

from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from pydantic import BaseModel, Field

from engine import __version__
from engine.contracts.errors import REASONS

Reason = Literal[tuple(sorted(REASONS))]  # type: ignore[valid-type]


class Window(BaseModel):
    start_ns: int = Field(description="Window start, ns since the Unix epoch (event time)")
    end_ns: int


class Result(BaseModel):
    """One fused window (or one part of it), on ``autoglm.out.<source>``;
    ``Nats-Msg-Id`` = ``result_id``. Parts of one window share ``source`` and
    ``window.start_ns``, hold disjoint events, and are merged by the consumer."""

    result_id: str = Field(
        description="<source>:<window start_ns>:<32 hex of sha256 over the sorted event ids>"
    )
    source: str
    window: Window
    events: dict[str, list[str]] = Field(description="Event ids per modality, in time order")
    missing: list[str]
    features: dict[str, dict[str, Any]] = Field(description="Compact per-modality summary")
    trace_id: str
    skipped: dict[str, list[str]] | None = Field(
        None, description="Ids of this window's events counted but not fused: rate_limited, stale"
    )
    prompt: str | None = Field(description="null when glm.include_prompt = false")
    answer: str | None = Field(description="null with backend none, on error, or when skipped")
    glm: dict[str, Any] = Field(description="backend, model, latency_ms, and error or skipped")
    latency_ms: dict[str, float] = Field(description="process, align, glm, event_to_result")


class Rejection(BaseModel):
    """One refused event, on ``autoglm.dlq.<source>`` (``autoglm.dlq._`` for a bad subject)."""

    subject: str
    source: str | None
    modality: str | None
    event_id: str | None
    timestamp_ns: str | None
    reason: Reason  # type: ignore[valid-type]
    message: str
    rejected_ns: int


broker = NatsBroker(logger=None, apply_types=False)


@broker.subscriber(
    "autoglm.in.{source}.{modality}",
    title="input",
    description=(
        "Raw payload bytes. Headers: AutoGLM-Timestamp (ns, required), Content-Type (required: "
        "image/jpeg, image/png, image/x-raw;format=bgr8;width=W;height=H, audio/wav, "
        "audio/pcm;rate=R;channels=C;format=s16le|f32le, text/plain;charset=utf-8), "
        "Nats-Msg-Id, AutoGLM-Seq, traceparent (optional)."
    ),
)
async def input_event(body: bytes) -> None:
    """Documentation only: the engine consumes this subject with nats-py."""


broker.publisher("autoglm.out.{source}", title="result", schema=Result, description=Result.__doc__)
broker.publisher("autoglm.dlq.{source}", title="rejected", schema=Rejection, description=Rejection.__doc__)

spec = AsyncAPI(broker, title="Open-AutoGLM", version=__version__, description=__doc__.split("\n")[0])
app = FastStream(broker, specification=spec)


def document() -> str:
    return spec.to_specification().to_json()


if __name__ == "__main__":
    print(document())
