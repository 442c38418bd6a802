"""The engine's policy, sans I/O: messages and time in, records and acks out.

:class:`Pipeline` routes each decoded event, applies the route's rate limit,
queues it for its batch, drops what went stale, hands the aligner what the
processors made, and turns closed windows and refusals into records. It
never awaits and imports nothing from NATS: the live driver
(:mod:`engine.runtime.driver`) and ``autoglm replay`` drive this same object
with their own clocks, and tests drive it by hand.

The caller's side of the protocol:

- :meth:`receive` a :class:`Message`; publish what it returns. While
  :attr:`paused` (a ``complete`` route's queue is full) receive nothing more.
- :meth:`batches` says which batches to run now (at most ``workers`` per
  route); run each through ``route.process`` and report it back with
  :meth:`batch_done` or :meth:`batch_failed`. :meth:`deadline` says when to
  ask again.
- :meth:`poll` (and :meth:`flush` at the end of a stream) close windows:
  :class:`Ask` goes to the GLM stage, whose answer comes back through
  :meth:`result`; :class:`Publish` goes out as it is.

Every event ends in exactly one record: a result that lists it (fused or
skipped) or a rejection; each record names the deliveries it finishes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from engine.align.aligner import Aligner
from engine.align.nearest import NearestAligner
from engine.contracts.errors import BackpressureError, EventRejected
from engine.contracts.messages import Finish, Key, Message, Publish
from engine.contracts.records import Latency, Rejection, Result, event_ids
from engine.contracts.subjects import Subjects
from engine.contracts.types import Clock, FusedFrame, InputEvent, Nanos
from engine.glm.trigger import ChangeTrigger, Verdict
from engine.observe.stats import EngineStats
from engine.pipeline.router import Outcome, Route, Router
from engine.wire import natsguard
from engine.wire.codec import ID_HEADER, TIMESTAMP_HEADER, Limits, decode_event, header

log = logging.getLogger("autoglm.engine")

#: ``(frame, record, result id, now) -> traceparent`` of the result's span, if traced.
Tracer = Callable[[FusedFrame, Result, str, Nanos], str | None]
#: Whether a delivery's record was stored before a crash lost its ack.
StoredBefore = Callable[[Key, str], bool]


@dataclass(frozen=True, slots=True)
class Ask:
    """A closed window for the GLM stage; its answer comes back through :meth:`Pipeline.result`."""

    frame: FusedFrame
    #: The trigger found no call due (``no_change``): the stage publishes it as skipped.
    skip: Verdict | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """Events due to run through ``route.process`` together."""

    route: Route
    events: list[InputEvent]


Output = Publish | Finish | Ask


class Pipeline:
    """Route -> rate limit -> batch -> (processors, run by the caller) -> align -> records."""

    def __init__(
        self,
        routes: Sequence[Route],
        aligner: Aligner | NearestAligner,
        *,
        prefix: str,
        limits: Limits,
        clock: Clock,
        glm_backend: str = "none",
        late_to: Literal["dlq", "late"] = "dlq",
        stats: EngineStats | None = None,
        stored_before: StoredBefore | None = None,
        tracer: Tracer | None = None,
        trigger: ChangeTrigger | None = None,
        batch_clock: Clock | None = None,
    ) -> None:
        self.routes = list(routes)
        self.router = Router(self.routes)
        self.aligner = aligner
        self.prefix = prefix
        self.subjects = Subjects(prefix)
        self.limits = limits
        self.clock = clock
        #: When batches fall due: monotonic in the live engine (a wall-clock step
        #: must not hold a queue), the same event-time clock in replay.
        self.batch_clock = batch_clock or clock
        #: Called with each decoded event before it is routed (replay's clock follows it).
        self.on_event: Callable[[InputEvent], None] | None = None
        self.glm_backend = glm_backend
        self.late_to = late_to
        self.stats = stats or EngineStats()
        self.stored_before = stored_before
        self.tracer = tracer
        self.trigger = trigger
        #: Replaced routes still finishing their queued batches.
        self.retiring: list[Route] = []
        #: Deliveries of events waiting in windows, acked with their result.
        self._deliveries: dict[Key, list[str]] = {}
        self._busy: dict[int, int] = {}
        #: A ``complete`` route's event waiting for room in its full queue.
        self._parked: tuple[Route, InputEvent] | None = None

    # -- intake -------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """A ``complete`` route's queue is full: receive nothing until :meth:`batches` makes room."""
        return self._parked is not None

    def receive(self, msg: Message) -> list[Output]:
        """Take one message. Nothing one message carries may stop intake: whatever
        goes wrong that is not a refusal (a bug, a library's surprise) becomes its
        rejection, reason ``internal_error``."""
        held: list[InputEvent] = []
        try:
            return self._take(msg, held)
        except Exception as exc:
            self.stats.internal_errors += 1
            log.exception("internal error on %s", natsguard.printable(msg.subject))
            acks = [msg.delivery] if msg.delivery else []
            for event in held:  # admitted before the failure: free its slot
                acks.extend(
                    d for d in self._deliveries.pop((event.source, event.event_id), ()) if d not in acks
                )
                if self._parked is not None and self._parked[1] is event:
                    self._unpause()
                with contextlib.suppress(KeyError):
                    self.aligner.discard(event.source, event.event_id)
            why = EventRejected("internal_error", f"{type(exc).__name__}: {exc}"[:500])
            return [self.rejection(msg.subject, msg.headers, why, self.modality_of(msg.subject), acks)]

    def refuse(self, msg: Message, exc: EventRejected, *, received: bool = True) -> Publish:
        """The rejection of a message refused before it was decoded (a claim
        check that failed, ``poison``); ``received``: count it as received."""
        modality = self.modality_of(msg.subject)
        if received:
            self.stats.received[modality] += 1
        return self.rejection(msg.subject, msg.headers, exc, modality, [msg.delivery] if msg.delivery else [])

    def _take(self, msg: Message, held: list[InputEvent]) -> list[Output]:
        try:
            event = decode_event(
                msg.subject,
                msg.headers,
                msg.data,
                prefix=self.prefix,
                limits=self.limits,
                received_ns=self.clock(),
                default_id=msg.delivery,
            )
        except EventRejected as exc:
            return [self.refuse(msg, exc)]
        self.stats.received[event.modality] += 1
        if self.on_event is not None:
            self.on_event(event)
        key = (event.source, event.event_id)
        delivery = msg.delivery
        if delivery is not None and self.stored_before is not None and self.stored_before(key, delivery):
            return [Finish((delivery,))]  # in a result stored before a crash lost its ack
        try:
            route = self.router.route_for(event)
            if route.limiter is not None and not route.limiter.allow(event.source, event.ts_ns):
                self.stats.rate_limited[event.modality] += 1
                self.aligner.skip(event, "rate_limited", admitted=False)
                self._hold(key, delivery)  # listed in its window's result, acked with it
                return []
            self.aligner.admit(event)
        except EventRejected as exc:
            if exc.reason == "duplicate" and delivery is not None and key in self._deliveries:
                self._hold(key, delivery)  # another copy of an event still in a window: acked with it
                return []
            if exc.reason == "duplicate":
                self.stats.duplicates[event.modality] += 1
            acks = [delivery] if delivery else []
            return [self.rejection(event.subject, msg.headers, exc, event.modality, acks)]
        held.append(event)
        self._hold(key, delivery)
        if route.config.intake == "complete" and len(route.batcher) >= route.batcher.max_queue:
            # The backlog stays upstream, nothing is dropped; and while intake
            # waits, quiet sources are not idle: their events are not read yet.
            self.stats.intake_waits += 1
            self._parked = (route, event)
            self.aligner.pause_idle()
            return []
        return self._offer(route, event)

    def _hold(self, key: Key, delivery: str | None) -> None:
        if delivery is not None:
            self._deliveries.setdefault(key, []).append(delivery)

    def _offer(self, route: Route, event: InputEvent) -> list[Output]:
        try:
            dropped = route.batcher.offer(event, self.batch_clock())
        except BackpressureError as exc:
            return self.abandon(event, EventRejected("overloaded", str(exc)))
        if dropped is not None:
            why = EventRejected("overloaded", f"dropped as the oldest in a full queue ({route.name})")
            return self.abandon(dropped, why)
        return []

    def _unpause(self) -> None:
        self._parked = None
        self.aligner.resume_idle()

    def pause_idle(self) -> None:
        """Nothing can be read or stored for now: stop the idle clock of quiet sources."""
        self.aligner.pause_idle()

    def resume_idle(self) -> None:
        self.aligner.resume_idle()

    # -- handing sources over ---------------------------------------------------------

    def pending_of(self, owns: Callable[[str], bool]) -> bool:
        """An event of a source ``owns`` picks is queued or in its processors."""
        parked = self._parked is not None and owns(self._parked[1].source)
        return parked or self.aligner.pending_of(owns)

    def close_sources(self, owns: Callable[[str], bool]) -> None:
        """Seal the windows of the sources ``owns`` picks: the next :meth:`poll` emits them."""
        self.aligner.close_sources(owns)

    def release(self, owns: Callable[[str], bool]) -> list[str]:
        """Hand over the sources ``owns`` picks (their partition moves to another
        worker): their open windows are dropped, unpublished, and the deliveries
        of every event in them come back for the transport to leave unacked, so
        the new owner receives them again and builds those windows whole. Call
        once :meth:`pending_of` is false and :meth:`poll`'s records are out."""
        given: list[str] = []
        for key in self.aligner.release(owns):
            given.extend(self._deliveries.pop(key, ()))
        if self.trigger is not None:
            self.trigger.forget(owns)
        return given

    # -- batches ------------------------------------------------------------------

    def batches(self, *, force: bool = False) -> list[Batch]:
        """The batches to run now (``force``: everything queued, at the end)."""
        now = self.batch_clock()
        out: list[Batch] = []
        for route in (*self.routes, *self.retiring):
            while self._busy.get(id(route), 0) < route.config.workers:
                events = route.batcher.take(now, force=force)
                if not events:
                    break
                if route.config.intake == "real_time":
                    events = self._fresh(route, events, self.clock())
                    if not events:
                        continue
                self._busy[id(route)] = self._busy.get(id(route), 0) + 1
                out.append(Batch(route, events))
        if self._parked is not None:
            route, event = self._parked
            if len(route.batcher) < route.batcher.max_queue:
                self._unpause()
                route.batcher.offer(event, now)
                return out + self.batches(force=force)
        return out

    def _fresh(self, route: Route, events: list[InputEvent], now: Nanos) -> list[InputEvent]:
        """``real_time``: skip what is already older than ``max_staleness_ms``, so a
        machine that is too slow falls behind by skipping, not by queueing."""
        limit = now - route.config.max_staleness_ms * 1_000_000
        fresh = []
        for event in events:
            if event.ts_ns >= limit:
                fresh.append(event)
            else:
                self.stats.stale[event.modality] += 1
                self.aligner.skip(event, "stale", admitted=True)  # listed in its window's result
        return fresh

    def until_due(self) -> Nanos | None:
        """Nanoseconds until the next batch falls due by time (``None``: only new events make one)."""
        deadline = self.deadline()
        return None if deadline is None else max(0, deadline - self.batch_clock())

    def deadline(self) -> Nanos | None:
        """When (on :attr:`batch_clock`) the next batch falls due by time."""
        due = [
            d
            for r in (*self.routes, *self.retiring)
            if self._busy.get(id(r), 0) < r.config.workers and (d := r.batcher.deadline()) is not None
        ]
        return min(due, default=None)

    def busy(self) -> bool:
        """Events are queued or being processed."""
        return any(len(r.batcher) or self._busy.get(id(r), 0) for r in (*self.routes, *self.retiring))

    def batch_done(self, batch: Batch, outcomes: Sequence[Outcome], took_ns: Nanos = 0) -> list[Output]:
        route = batch.route
        self._busy[id(route)] -= 1
        while route.timings:
            decode_s, model_s = route.timings.popleft()
            self.stats.observe("decode", decode_s)
            self.stats.observe("model", model_s)
        out: list[Output] = []
        for event, outcome in zip(batch.events, outcomes, strict=True):
            try:
                if isinstance(outcome, EventRejected):
                    out.extend(self.abandon(event, outcome))
                else:
                    self.stats.processed[event.modality] += 1
                    self.aligner.complete(event.source, event.event_id, outcome, took_ns)
            except Exception as exc:  # as at intake: one event's bug is its own rejection
                self.stats.internal_errors += 1
                log.exception("internal error completing %s", event.event_id)
                with contextlib.suppress(Exception):
                    self.aligner.discard(event.source, event.event_id)
                acks = self._deliveries.pop((event.source, event.event_id), [])
                why = EventRejected("internal_error", f"{type(exc).__name__}: {exc}"[:500])
                hdrs = {TIMESTAMP_HEADER: str(event.ts_ns), ID_HEADER: event.event_id}
                out.append(self.rejection(event.subject, hdrs, why, event.modality, acks))
        return out

    def batch_failed(self, batch: Batch, exc: BaseException) -> list[Output]:
        self._busy[id(batch.route)] -= 1
        self.stats.batch_errors += 1
        first = batch.events[0]
        log.error(
            "batch of %d %s events failed: %s",
            len(batch.events),
            first.modality,
            exc,
            exc_info=exc,
            extra={"source": first.source, "reason": "processor_error"},
        )
        why = EventRejected("processor_error", f"{type(exc).__name__}: {exc}")
        return [p for event in batch.events for p in self.abandon(event, why)]

    def abandon(self, event: InputEvent, exc: EventRejected) -> list[Output]:
        """An admitted event that will not be fused: free its slot, reject it."""
        self.aligner.discard(event.source, event.event_id)
        acks = self._deliveries.pop((event.source, event.event_id), [])
        hdrs = {TIMESTAMP_HEADER: str(event.ts_ns), ID_HEADER: event.event_id}
        return [self.rejection(event.subject, hdrs, exc, event.modality, acks)]

    # -- routes -------------------------------------------------------------------

    def swap_trigger(self, trigger: ChangeTrigger | None) -> None:
        """A reload's trigger; it keeps what the running one remembers of each source."""
        if trigger is not None and self.trigger is not None:
            trigger.adopt(self.trigger)
        self.trigger = trigger

    def swap_routes(self, routes: Sequence[Route]) -> None:
        """New events go to ``routes``; the routes left out finish what they queued."""
        self.retiring.extend(r for r in self.routes if all(r is not n for n in routes))
        self.routes = list(routes)
        self.router = Router(self.routes)

    def retired(self) -> list[Route]:
        """Replaced routes that have finished: the caller frees them."""
        done = [r for r in self.retiring if not len(r.batcher) and not self._busy.get(id(r), 0)]
        self.retiring = [r for r in self.retiring if all(r is not d for d in done)]
        for route in done:
            self._busy.pop(id(route), None)
        return done

    # -- output -------------------------------------------------------------------

    @property
    def has_ready(self) -> bool:
        return self.aligner.has_ready

    def poll(self) -> list[Output]:
        """Close the windows that are due and turn them into outputs."""
        return self._frames(self.aligner.poll())

    def flush(self) -> list[Output]:
        """End of stream: close every open window now."""
        return self._frames(self.aligner.flush())

    def _frames(self, frames: list[FusedFrame]) -> list[Output]:
        out: list[Output] = []
        for frame in frames:
            if frame.modalities:
                out.append(Ask(frame, self._skip(frame)))
            else:  # only skipped events: nothing to ask the model about
                part_glm = {"prompt": None, "answer": None, "glm": {"backend": self.glm_backend}}
                out.append(self.result(frame, part_glm))
        return out

    def _skip(self, frame: FusedFrame) -> Verdict | None:
        """The trigger's verdict when it skips the call. Its bug (a processor's
        vocabulary) must not lose the frame: the frame is sent on."""
        if self.trigger is None:
            return None
        try:
            verdict = self.trigger.decide(frame)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("the GLM trigger failed on a frame of %s; sending it on", frame.source)
            return None
        return None if verdict.send else verdict

    def give_up(self, frame: FusedFrame) -> tuple[str, ...]:
        """The deliveries of ``frame``'s events, forgotten: its result cannot be
        made (the caller gives them back to be delivered again)."""
        return tuple(d for eid in event_ids(frame) for d in self._deliveries.pop((frame.source, eid), ()))

    def result(self, frame: FusedFrame, glm: dict[str, Any]) -> Publish:
        """The finished result of ``frame``: ``glm`` is the GLM stage's part
        (``prompt``, ``answer``, ``glm``); the latencies are added here."""
        now = self.clock()
        latest = max((ts for f in frame.modalities.values() for ts in f.timestamps), default=now)
        process = round(frame.process_ns / 1e6, 3)
        align = round((frame.closed_ns - frame.first_arrival_ns) / 1e6, 3)
        glm_ms = glm["glm"].get("latency_ms", 0.0)
        event_to_result = round((now - latest) / 1e6, 3)
        observe = self.stats.observe
        observe("process", process / 1000)
        observe("align", align / 1000)
        observe("glm", glm_ms / 1000)
        observe("event_to_result", event_to_result / 1000)
        lat: Latency = {"process": process, "align": align, "glm": glm_ms, "event_to_result": event_to_result}
        record = Result.of(frame, prompt=glm["prompt"], answer=glm["answer"], glm=glm["glm"], latency_ms=lat)
        headers = {ID_HEADER: record.result_id}
        traceparent = self.tracer(frame, record, record.result_id, now) if self.tracer is not None else None
        if traceparent:
            headers["traceparent"] = traceparent
        acks = (  # nothing is held where nothing is acked (core NATS)
            [d for eid in event_ids(frame) for d in self._deliveries.pop((frame.source, eid), ())]
            if self._deliveries
            else []
        )
        self.stats.results += 1
        for mod, fused in frame.modalities.items():
            self.stats.results_events[mod] += len(fused.event_ids)
        return Publish(self.subjects.result(frame.source), record.to_bytes(), headers, tuple(acks))

    def rejection(
        self,
        subject: str,
        headers: Any,
        exc: EventRejected,
        modality: str,
        acks: Sequence[str] = (),
    ) -> Publish:
        """The rejection record naming the subject, event id, reason and what was wrong."""
        self.stats.rejected[(modality, exc.reason)] += 1
        self.stats.dlq_published += 1
        hdrs = headers if isinstance(headers, Mapping) else None
        shown = natsguard.printable(subject)
        source = self.subjects.source_of(subject)
        record = Rejection._trusted(
            {
                "subject": shown,
                "source": source,
                "modality": modality if modality != "?" else None,
                "event_id": header(hdrs, ID_HEADER),
                "timestamp_ns": header(hdrs, TIMESTAMP_HEADER),
                "reason": exc.reason,
                "message": exc.message,
                "rejected_ns": self.clock(),
            }
        )
        log.info(
            "rejected %s: %s", shown, exc, extra={"source": source, "subject": shown, "reason": exc.reason}
        )
        target = self.subjects.dlq(source)
        if exc.reason == "too_late" and self.late_to == "late" and source:
            target = self.subjects.late(source)
        return Publish(
            target, record.to_bytes(), acks=tuple(acks), kind="rejection", terminate=exc.reason == "poison"
        )

    def modality_of(self, subject: str) -> str:
        """The modality token of a subject that may not parse (``?`` when it does not)."""
        return subject.rsplit(".", 1)[-1] if self.subjects.source_of(subject) else "?"
