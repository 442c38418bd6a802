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

from engine.config.models import EngineConfig
from engine.contracts.errors import ConfigError, EventRejected, TransportError
from engine.contracts.types import FusedFrame, InputEvent, Nanos
from engine.pipeline.router import Route, Router
from engine.runtime.build import build_aligner, build_routes
from engine.runtime.engine import frame_record
from engine.transport.jetstream import record_stream
from engine.wire import claimcheck, natsguard
from engine.wire.codec import (
    ID_HEADER,
    TIMESTAMP_HEADER,
    Limits,
    decode_event,
    header,
    parse_timestamp,
    source_of,
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
    """The engine's processing path, driven by recorded messages instead of NATS."""

    def __init__(self, config: EngineConfig, out: IO[bytes], routes: list[Route] | None = None) -> None:
        self.config = config
        self.out = out
        self.clock = EventClock()
        self.routes = routes or build_routes(config)
        self.router = Router(self.routes)
        self.aligner = build_aligner(config.aligner, self.clock)
        self.stats = ReplayStats()
        self.limits = Limits(max_payload_bytes=config.limits.max_payload_bytes)
        self._pending: dict[int, list[InputEvent]] = {}

    def close(self) -> None:
        for route in self.routes:
            route.close()

    def feed(self, subject: str, headers: dict[str, str] | None, data: bytes, default_id: str) -> None:
        self.stats.read += 1
        try:
            self._feed(subject, headers, data, default_id)
        except Exception as exc:  # as in the engine: one message never stops the run
            why = EventRejected("internal_error", f"{type(exc).__name__}: {exc}"[:500])
            self.reject(subject, header(headers, ID_HEADER), why)

    def _feed(self, subject: str, headers: dict[str, str] | None, data: bytes, default_id: str) -> None:
        try:
            event = decode_event(
                subject,
                headers,
                data,
                prefix=self.config.nats.subject_prefix,
                limits=self.limits,
                received_ns=self.clock.now,
                default_id=default_id,
            )
        except EventRejected as exc:
            self.reject(subject, header(headers, ID_HEADER), exc)
            return
        self.clock.now = max(self.clock.now, event.ts_ns)
        try:
            route = self.router.route_for(event)
            if route.limiter is not None and not route.limiter.allow(event.source, event.ts_ns):
                self.stats.rate_limited += 1
                self.aligner.skip(event, "rate_limited", admitted=False)
                return
            self.aligner.admit(event)
        except EventRejected as exc:
            self.reject(subject, event.event_id, exc)
            return
        batch = self._pending.setdefault(id(route), [])
        batch.append(event)
        if len(batch) >= route.config.batch.max_batch_size:
            self._run(route)
        self._cut_by_event_time()
        self._emit(self.aligner.poll())

    def finish(self) -> None:
        for route in self.routes:
            self._run(route)
        self._emit(self.aligner.flush())

    def _cut_by_event_time(self) -> None:
        for route in self.routes:
            batch = self._pending.get(id(route))
            if batch and self.clock.now - batch[0].ts_ns >= route.config.batch.max_wait_ms * 1_000_000:
                self._run(route)

    def _run(self, route: Route) -> None:
        events = self._pending.pop(id(route), [])
        if not events:
            return
        outcomes = route.process(events)
        for event, outcome in zip(events, outcomes, strict=True):
            if isinstance(outcome, EventRejected):
                self.aligner.discard(event.source, event.event_id)
                self.reject(event.subject, event.event_id, outcome)
            else:
                self.aligner.complete(event.source, event.event_id, outcome)

    def _emit(self, frames: list[FusedFrame]) -> None:
        for frame in frames:
            record = frame_record(frame)
            self.stats.frames += 1
            self.stats.fused += sum(len(ids) for ids in record["events"].values())
            self.out.write(orjson.dumps(record) + b"\n")

    def reject(self, subject: str, event_id: str | None, exc: EventRejected) -> None:
        """Count a refused event and write its line (the engine would send a DLQ record)."""
        self.stats.rejected[exc.reason] += 1
        record = {
            "rejected": {
                "subject": natsguard.printable(subject),
                "source": source_of(subject, self.config.nats.subject_prefix),
                "event_id": event_id,
                "reason": exc.reason,
                "message": exc.message,
            }
        }
        self.out.write(orjson.dumps(record) + b"\n")


async def recorded(nc: Any, config: EngineConfig, since: datetime | None) -> AsyncIterator[Any]:
    """Every message of the input stream from ``since`` to its end at the time
    of the call, fetched 500 at a time (a day of recording never sits in memory)."""
    js = nc.jetstream()
    stream = record_stream(config.nats)
    try:
        info = await js.stream_info(stream)
    except Exception as exc:  # not found: core mode, or another prefix
        raise TransportError(
            f"no recorded input stream {stream} on this server (durable mode records inputs "
            f"unless nats.record_max_bytes = 0): {exc}"
        ) from exc
    last = info.state.last_seq
    if not info.state.messages:
        return
    policy = DeliverPolicy.ALL if since is None else DeliverPolicy.BY_START_TIME
    sub = await js.pull_subscribe(
        f"{config.nats.subject_prefix}.in.>",
        stream=stream,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=policy,
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
                    r.stats.read += 1
                    r.reject(msg.subject, header(msg.headers, ID_HEADER), exc)
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
