"""``autoglm replay``: re-feed the recorded input stream through fresh routes and a fresh aligner.

Durable mode records every input in the JetStream stream ``<PREFIX>_REC``, a
mirror of the input work queue (``record_max_age_s``, ``record_max_bytes``).
Replay reads it from ``--since`` in stream order with an ephemeral consumer
(the engine's durable consumer is not touched, so it is safe beside a running
engine) and writes one JSON line per fused frame (the
same record the engine publishes, without the GLM) and one per rejected event.

Replaying the same events gives the same bytes: the aligner runs on a clock
made of event time (the newest timestamp fed so far), never the wall clock,
and micro-batches are cut by event time too (``max_wait_ms`` of event time,
or ``max_batch_size``), so neither the machine's speed nor ``--speed`` changes
the result. ``--speed X`` paces the feed at X times the recorded rate (for
watching, or for benchmarks at a realistic rate); ``max`` goes flat out.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from engine.config.models import EngineConfig, updated
from engine.contracts.errors import ConfigError, EventRejected, TransportError
from engine.contracts.messages import Message, Publish
from engine.contracts.records import FrameRecord
from engine.contracts.subjects import Subjects
from engine.contracts.types import InputEvent, Nanos
from engine.pipeline.pipeline import Ask, Output, Pipeline
from engine.pipeline.router import Route
from engine.runtime.build import build_aligner, build_routes
from engine.transport.streams import record_stream
from engine.wire import claimcheck, natsguard
from engine.wire.codec import (
    TIMESTAMP_HEADER,
    Limits,
    header,
    parse_timestamp,
)

_REL = re.compile(r"(\d+(?:\.\d+)?)([smhd])", re.ASCII)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> datetime | None:
    """``all``, a duration ago (``90s``, ``15m``, ``2h``, ``1d``) or an ISO 8601
    time with a zone (``2026-11-29T10:00:00Z``); ``None`` means the beginning."""
    text = text.strip()
    if text in ("all", "0", "start"):
        return None
    now = time.time() if now is None else now
    m = _REL.fullmatch(text)
    if m:
        try:
            return datetime.fromtimestamp(now - float(m[1]) * _UNIT[m[2]], UTC)
        except (OverflowError, ValueError, OSError):  # further back than a date reaches
            raise ConfigError([f"--since {text!r}: too far back; use all for the whole recording"]) from None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError([f"--since {text!r}: use all, a duration such as 15m, or an ISO time"]) from None
    if when.tzinfo is None:
        raise ConfigError([f"--since {text!r}: give a time zone (Z or +hh:mm); naive times are ambiguous"])
    return when


class EventClock:
    """The aligner's clock in replay: the newest event time fed so far."""

    def __init__(self) -> None:
        self.now: Nanos = 0

    def __call__(self) -> Nanos:
        return self.now


@dataclass
class ReplayStats:
    read: int = 0
    frames: int = 0
    fused: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    rate_limited: int = 0


class Replayer:
    """The engine's own pipeline, driven by recorded messages on an event-time clock.

    Batches run inline as they fall due (by size, or ``max_wait_ms`` of event
    time), so the output depends on the events alone. Each fused frame is
    written as the record the engine publishes before the GLM adds its part,
    each refused event as ``{"rejected": <the engine's DLQ record>}``."""

    def __init__(self, config: EngineConfig, out: IO[bytes], routes: list[Route] | None = None) -> None:
        self.config = config
        self.out = out
        self.clock = EventClock()
        # Staleness and queue overload are live-load policies (a machine too slow
        # for real time); a replay runs at its own pace and fuses every event.
        complete = updated(config, {"routes": [updated(r, {"intake": "complete"}) for r in config.routes]})
        self.pipeline = Pipeline(
            routes or build_routes(complete),
            build_aligner(config.aligner, self.clock),
            prefix=config.nats.subject_prefix,
            limits=Limits(max_payload_bytes=config.limits.max_payload_bytes),
            clock=self.clock,
            glm_backend=config.glm.backend,
            late_to=config.aligner.late_to,
        )
        self.stats = ReplayStats()
        self.pipeline.on_event = self._advance

    def _advance(self, event: InputEvent) -> None:
        """The event-time clock follows decoded events only: a refused message's
        header (a future timestamp) must not close every window early."""
        self.clock.now = max(self.clock.now, event.ts_ns)

    @property
    def routes(self) -> list[Route]:
        return self.pipeline.routes

    def close(self) -> None:
        for route in self.pipeline.routes:
            route.close()

    def feed(self, subject: str, headers: dict[str, str] | None, data: bytes, delivery: str) -> None:
        self.stats.read += 1
        self._emit(self.pipeline.receive(Message(subject, headers, data, delivery)))
        self._run()
        if self.pipeline.paused or any(len(r.batcher) >= r.batcher.max_queue for r in self.pipeline.routes):
            # No wall time passes here: running what is queued is waiting for room.
            self._run(force=True)
        self._emit(self.pipeline.poll())

    def refuse(self, subject: str, headers: dict[str, str] | None, delivery: str, exc: EventRejected) -> None:
        """A message refused before it reached the pipeline (its claim check failed)."""
        self.stats.read += 1
        self._emit([self.pipeline.refuse(Message(subject, headers, b"", delivery), exc)])

    def finish(self) -> None:
        self._run(force=True)
        self._emit(self.pipeline.flush())

    def _run(self, *, force: bool = False) -> None:
        while batches := self.pipeline.batches(force=force):
            for batch in batches:
                try:
                    outcomes = batch.route.process(batch.events)
                except Exception as exc:
                    self._emit(self.pipeline.batch_failed(batch, exc))
                else:
                    self._emit(self.pipeline.batch_done(batch, outcomes))

    def _emit(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Ask):
                self._frame(FrameRecord.from_frame(out.frame).to_bytes())
            elif isinstance(out, Publish) and out.kind == "rejection":
                record = orjson.loads(out.payload)
                self.stats.rejected[record["reason"]] += 1
                self.out.write(orjson.dumps({"rejected": record}) + b"\n")
            elif isinstance(out, Publish):  # a window of skipped events only: its window part
                record = orjson.loads(out.payload)
                for live_only in ("prompt", "answer", "glm", "latency_ms"):
                    del record[live_only]
                self._frame(orjson.dumps(record))
        self.stats.rate_limited = sum(self.pipeline.stats.rate_limited.values())

    def _frame(self, line: bytes) -> None:
        self.stats.frames += 1
        self.stats.fused += sum(len(ids) for ids in orjson.loads(line)["events"].values())
        self.out.write(line + b"\n")


async def recorded(nc: Any, config: EngineConfig, since: datetime | None) -> AsyncIterator[Any]:
    """Every message of the input stream from ``since`` to its end at the time
    of the call, fetched 500 at a time (a day of recording never sits in memory)."""
    stream = record_stream(config.nats)
    # everything the recording holds: inputs as sent (in.>), or as the
    # partition transform stored them (part.>)
    async for msg in stored_until_now(
        nc,
        stream,
        Subjects(config.nats.subject_prefix).everything,
        since,
        f"no recorded input stream {stream} on this server (durable mode records inputs "
        "unless nats.record_max_bytes = 0)",
    ):
        yield msg


async def stored_until_now(
    nc: Any, stream: str, subject: str, since: datetime | None, missing: str
) -> AsyncIterator[Any]:
    """The messages of ``stream`` on ``subject`` from ``since`` (``None``: its
    start) to its last one at the time of the call, 500 at a time, read by an
    ephemeral consumer that acks nothing; ``missing`` says why there is no
    such stream (the server's reason follows it)."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(stream)
    except Exception as exc:  # not found: core mode, or another prefix
        raise TransportError(f"{missing}: {exc}") from exc
    last = info.state.last_seq
    if not info.state.messages:
        return
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL if since is None else DeliverPolicy.BY_START_TIME,
            opt_start_time=since,
            inactive_threshold=30.0,
        ),
    )
    try:
        while True:
            try:
                batch = await sub.fetch(500, timeout=1.0)
            except Exception:  # nats TimeoutError: nothing (more) from that time on
                break
            for msg in batch:
                yield msg
            if batch and batch[-1].metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()


async def replay(
    nc: Any,
    config: EngineConfig,
    since: datetime | None,
    speed: float | None,
    out: IO[bytes],
    *,
    replayer: Replayer | None = None,
) -> ReplayStats:
    """Feed the recorded stream through a fresh pipeline; ``speed=None`` is flat out."""
    natsguard.install()  # a recorded subject that is not UTF-8 must not end the read loop
    r = replayer if replayer is not None else await asyncio.to_thread(Replayer, config, out)
    claims = claimcheck.ClaimChecks(
        nc.jetstream(), config.limits.max_payload_bytes, config.nats.object_bucket
    )
    first_ts: int | None = None
    started = time.monotonic()
    try:
        async for msg in recorded(nc, config, since):
            headers, data = msg.headers, msg.data
            if claimcheck.is_ref(headers):
                try:
                    headers, data = await claims.resolve(headers or {}, data)
                except EventRejected as exc:
                    r.refuse(msg.subject, msg.headers, f"js{msg.metadata.sequence.stream}", exc)
                    continue
            if speed is not None:
                ts = _ts(headers)
                if ts is not None:
                    first_ts = ts if first_ts is None else first_ts
                    due = started + (ts - first_ts) / 1e9 / speed
                    if due > time.monotonic():
                        await asyncio.sleep(due - time.monotonic())
            # The id the engine gave an event without Nats-Msg-Id, so results match.
            # Synchronous on purpose: nothing else runs on this loop, and a thread
            # hop per event would cost more than the work.
            r.feed(msg.subject, headers, data, f"js{msg.metadata.sequence.stream}")
        r.finish()
    finally:
        if replayer is None:
            r.close()
    return r.stats


def _ts(headers: dict[str, str] | None) -> int | None:
    """The event time as the engine reads it (pacing only; a bad one is refused later)."""
    try:
        return parse_timestamp(header(headers, TIMESTAMP_HEADER))
    except EventRejected:
        return None


def summary(stats: ReplayStats, seconds: float) -> str:
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(stats.rejected.items())) or "none"
    return (
        f"autoglm replay: {stats.read} events read in {seconds:.1f} s, {stats.frames} frames "
        f"({stats.fused} events fused), rejected: {rejected}, rate-limited {stats.rate_limited}"
    )


def stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
