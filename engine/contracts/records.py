"""The records the engine publishes: a window's result and its identity.

The result identity is ``<source>:<window start_ns>:<digest>``, the digest a
sha256 over the window's event ids (fused and skipped). The results stream
deduplicates on it (``Nats-Msg-Id``): the same window rebuilt with the same
events after a crash is stored once, while a window that receives more events
after it was published (a source evicted and back, a restart) gets a new id,
so its second *part* is stored too instead of being dropped as a duplicate.
Consumers merge parts of one window by ``(source, window.start_ns)``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from engine.contracts.types import FusedFrame


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


def frame_record(frame: FusedFrame) -> dict[str, Any]:
    """The deterministic part of a result: same events + same clock -> same bytes."""
    record: dict[str, Any] = {
        "result_id": result_id(frame),
        "source": frame.source,
        "window": {"start_ns": frame.start_ns, "end_ns": frame.end_ns},
        "events": {m: list(f.event_ids) for m, f in frame.modalities.items()},
        "missing": list(frame.missing),
        "features": {m: dict(f.summary) for m, f in frame.modalities.items()},
        "trace_id": trace_id_of(frame),
    }
    if frame.skipped:
        record["skipped"] = {why: list(ids) for why, ids in frame.skipped.items()}
    return record
