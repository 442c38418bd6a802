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


def shown(text: object) -> str:
    """``text`` safe on a terminal: control characters (escape sequences a
    producer put in an id, a message or an answer) as ``\\xNN``, runs of
    whitespace as one space."""
    flat = " ".join(str(text).split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in flat)


def _clock(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]


def line(record: Record) -> str:
    """One record as one readable line."""
    if isinstance(record, Rejection):
        return (
            f"{shown(record.source or '_')}  DLQ {shown(record.reason)}  {shown(record.event_id or '-')}: "
            f"{shown(record.message)}"
        )
    counts = " ".join(f"{shown(m)} {len(ids)}" for m, ids in record.events.items()) or "no events"
    skipped = sum(len(ids) for ids in (record.skipped or {}).values())
    parts = [
        shown(record.source),
        f"{_clock(record.window['start_ns'])}-{_clock(record.window['end_ns'])}",
        counts,
        f"missing {shown(','.join(record.missing)) or '-'}",
    ]
    if skipped:
        parts.append(f"skipped {skipped}")
    answer = record.answer
    if answer is not None:
        answer = shown(answer)
        parts.append(f"answer: {answer[:ANSWER_CHARS]}{'...' if len(answer) > ANSWER_CHARS else ''}")
    else:
        parts.append(f"glm {_glm(record)}")
    return "  ".join(parts)


def _glm(record: Result) -> str:
    glm: dict[str, object] = dict(record.glm)
    if "skipped" in glm:
        return f"skipped ({shown(glm['skipped'])})"
    if "error" in glm:
        return f"error ({shown(glm['error'])})"
    return shown(glm["backend"])


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
