"""The monitor's NATS side: what it reads, and nothing it writes but questions.

Results, DLQ and late records arrive on plain subscriptions (the engine
publishes them to everyone; a subscriber costs the engine nothing), the
engines' counters come from asking ``$SRV.STATS`` once a round (the same
question ``autoglm status`` asks), and, unless told not to, input frames come
from subscribing to the image inputs: the latest JPEG or PNG per source,
copied at most every ``frame_every`` seconds, is the card's thumbnail. The
engine never makes it for the monitor, so the hot path is the same with or
without a monitor. (``--secure``'s reader may not read inputs: its cards
show no frames.)

Nothing here publishes but the ``$SRV.STATS`` request: the monitor cannot
change what the engines do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from engine.contracts.errors import EventRejected
from engine.contracts.subjects import Subjects
from engine.monitor.state import MonitorState
from engine.observe.service import find_engines

log = logging.getLogger(__name__)


class Feed:
    """Subscribes and polls for one subject prefix; feeds :class:`MonitorState`."""

    def __init__(
        self,
        nc: Any,
        state: MonitorState,
        prefix: str = "autoglm",
        *,
        interval: float = 1.0,
        frames: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.nc, self.state, self.subjects = nc, state, Subjects(prefix)
        self.interval, self.frames, self.clock = interval, frames, clock
        self.rounds = 0
        self._subs: list[Any] = []
        self._poll: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.subjects
        self._subs.append(await self.nc.subscribe(s.results, cb=self._on_result))
        for subject in (s.rejections, s.lates):
            self._subs.append(await self.nc.subscribe(subject, cb=self._on_rejection))
        if self.frames:  # core-mode partitions rewrite in.* to part.<p>.*: read both
            for subject in (f"{s.prefix}.in.*.image", f"{s.prefix}.part.*.*.image"):
                self._subs.append(await self.nc.subscribe(subject, cb=self._on_frame))
        await self.nc.flush()
        self._poll = asyncio.create_task(self._stats_loop(), name="monitor-stats")

    async def stop(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
        for sub in self._subs:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await sub.unsubscribe()
        self._subs.clear()

    async def _on_result(self, msg: Any) -> None:
        record = _json(msg.data)
        if record is not None:
            self.state.on_result(record, self.clock())

    async def _on_rejection(self, msg: Any) -> None:
        record = _json(msg.data)
        if record is not None:
            self.state.on_rejection(record, self.clock())

    async def _on_frame(self, msg: Any) -> None:
        try:
            source = self.subjects.parse_input(msg.subject).source
        except EventRejected:  # not a valid input subject: the engine refuses it, we ignore it
            return
        headers = {k.lower(): v for k, v in (msg.headers or {}).items()}
        self.state.on_frame(source, headers.get("content-type", ""), msg.data, self.clock())

    async def _stats_loop(self) -> None:
        while True:
            try:
                replies = await find_engines(self.nc, wait=min(0.5, self.interval))
            except Exception as exc:  # NATS away for a moment: the page says so by its stale rates
                log.warning("monitor: $SRV.STATS failed: %s: %s", type(exc).__name__, exc)
            else:
                ours = [r for r in replies if _prefix(r) == self.subjects.prefix]
                self.state.on_stats(ours, self.clock())
                self.rounds += 1
            await asyncio.sleep(self.interval)


def _prefix(reply: dict[str, Any]) -> str:
    return str((reply.get("metadata") or {}).get("subject_prefix", ""))


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None
