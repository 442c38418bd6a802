"""What crosses between a transport and the pipeline.

A transport turns what NATS delivers into :class:`Message` values and hands
them in; the pipeline answers with :class:`Publish` records (each naming the
deliveries it finishes) and :class:`Finish` notices (deliveries done with
nothing to publish). Neither side knows how the other works: core NATS and
JetStream differ only in what a *delivery* is and what acking it means.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

#: ``(source, event id)``: how the pipeline names an event it still owes a record.
Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Message:
    """One input message as a transport received it.

    ``delivery`` is the transport's name for it, the same on every
    redelivery (JetStream: ``js<stream sequence>``); ``None`` where nothing
    is ever acked (core NATS)."""

    subject: str
    headers: Mapping[str, str] | None
    data: bytes
    delivery: str | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    """A record to publish. Once it is stored, ``acks`` are finished."""

    subject: str
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)
    acks: tuple[str, ...] = ()
    kind: Literal["result", "rejection"] = "result"
    #: ``poison``: the finished delivery is terminated, not acked (JetStream
    #: must not deliver it again even if the consumer is rebuilt).
    terminate: bool = False


@dataclass(frozen=True, slots=True)
class Finish:
    """Deliveries that are done with nothing (more) to publish: their record
    was stored before a crash lost the ack."""

    acks: tuple[str, ...]
