"""``autoglm tail``: results (and with ``--dlq`` rejections) as they arrive.

One readable line per window by default — source, the window's event-time
span, events per modality, what was missing, the GLM's answer — or with
``--json`` each record as the engine published it, one per line (what
``jq`` and other programs read). Built on :class:`engine.sources.results.Results`.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TextIO

from engine.contracts.records import Rejection, Result
from engine.sources.results import Record, Results

#: How much of an answer a readable line shows.
ANSWER_CHARS = 160


def _clock(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]


def line(record: Record) -> str:
    """One record as one readable line."""
    if isinstance(record, Rejection):
        return (
            f"{record.source or '_'}  DLQ {record.reason}  {record.event_id or '-'}: "
            f"{' '.join(record.message.split())}"
        )
    counts = " ".join(f"{m} {len(ids)}" for m, ids in record.events.items()) or "no events"
    skipped = sum(len(ids) for ids in (record.skipped or {}).values())
    parts = [
        record.source,
        f"{_clock(record.window['start_ns'])}-{_clock(record.window['end_ns'])}",
        counts,
        f"missing {','.join(record.missing) or '-'}",
    ]
    if skipped:
        parts.append(f"skipped {skipped}")
    answer = record.answer
    if answer is not None:
        answer = " ".join(answer.split())
        parts.append(f"answer: {answer[:ANSWER_CHARS]}{'...' if len(answer) > ANSWER_CHARS else ''}")
    else:
        parts.append(f"glm {_glm(record)}")
    return "  ".join(parts)


def _glm(record: Result) -> str:
    glm: dict[str, object] = dict(record.glm)
    if "skipped" in glm:
        return f"skipped ({glm['skipped']})"
    if "error" in glm:
        return f"error ({glm['error']})"
    return str(glm["backend"])


async def tail(results: Results, *, as_json: bool, count: int | None, out: TextIO | None = None) -> int:
    """Print records until ``count`` of them (or forever); returns how many."""
    out = out or sys.stdout
    seen = 0
    async with results:
        async for record in results:
            out.write(record.to_bytes().decode() if as_json else line(record))
            out.write("\n")
            out.flush()
            seen += 1
            if count is not None and seen >= count:
                break
    return seen
