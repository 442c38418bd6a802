"""The running engine: NATS in, route -> batch -> process -> align -> GLM -> NATS out.

FastStream's :class:`NatsBroker` owns the connection (lifecycle, reconnects,
callbacks); the ingest subscription and the result publishes use its nats-py
client directly, because FastStream's per-message machinery costs ~30x the
throughput on this hot path (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.errors import SlowConsumerError

from engine.align.aligner import Aligner
from engine.align.nearest import NearestAligner
from engine.config.models import EngineConfig, Overrides
from engine.contracts.errors import BackpressureError, ConfigError, EventRejected, TransportError
from engine.contracts.records import event_ids, frame_record, result_id
from engine.contracts.types import Clock, FusedFrame, InputEvent
from engine.glm.stage import GLMStage
from engine.observe.metrics import MetricsServer
from engine.observe.service import refuse_a_second_engine, register
from engine.observe.stats import EngineStats
from engine.observe.tracing import Tracing
from engine.pipeline.batcher import BatchWorker
from engine.pipeline.router import Route, Router
from engine.runtime.build import build_aligner, build_glm_stage, build_routes, build_tracing
from engine.runtime.server import EmbeddedServer
from engine.runtime.supervisor import Supervisor
from engine.transport.jetstream import DurableIntake, Key, dlq_msg_id
from engine.transport.resultstore import ResultStore
from engine.transport.security import redact_url, security_for
from engine.transport.sync import sync_with_server
from engine.wire import claimcheck, natsguard
from engine.wire.codec import (
    ID_HEADER,
    TIMESTAMP_HEADER,
    Limits,
    decode_event,
    dlq_subject,
    header,
    source_of,
)

log = logging.getLogger("autoglm.engine")

#: Messages nats-py may buffer for our ingest subscription before it reports a
#: slow consumer (and drops, which we count).
PENDING_MSGS = 200_000


__all__ = ["Engine", "frame_record"]

#: Seconds a store keeps retrying once the engine is stopping; past it the
#: inputs stay unacked and JetStream delivers them to the next engine.
STOP_RETRY_S = 10.0
#: Seconds the fetch loop may spend on one message (with no reason such as a
#: store retrying or a full queue) before the engine counts itself hung and
#: exits for a fresh start. Claim-check fetches are bounded well below it.
HUNG_AFTER_S = 60.0


class Engine:
    """One engine instance. ``async with Engine(cfg) as e:`` starts and drains it."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        clock: Clock = time.time_ns,
        routes: list[Route] | None = None,
        tracing: Tracing | None = None,
        config_path: str | Path | None = None,
        overrides: Overrides | None = None,
    ) -> None:
        natsguard.install()
        self.config = config
        self.prefix = config.nats.subject_prefix
        self.limits = Limits(max_payload_bytes=config.limits.max_payload_bytes)
        self.clock = clock
        self.routes = routes or build_routes(config)
        self.router = Router(self.routes)
        self.aligner: Aligner | NearestAligner = build_aligner(config.aligner, clock)
        self.glm: GLMStage = build_glm_stage(config.glm, self.send_result)
        self.stats = EngineStats()
        self.tracing = tracing or build_tracing(config.tracing)
        self.url: str | None = None
        self._server: EmbeddedServer | None = None
        self._broker: NatsBroker | None = None
        self._nc: Any = None
        self._sub: Any = None
        self._js: Any = None
        self.intake: DurableIntake | None = None
        self.claims: claimcheck.ClaimChecks | None = None
        self.results: ResultStore | None = None
        self.metrics: MetricsServer | None = None
        self.service: Any = None
        #: id(route) -> its batch worker and model threads.
        self._workers: dict[int, tuple[BatchWorker[InputEvent], ThreadPoolExecutor]] = {}
        #: Routes and GLM stages replaced by a reload, finishing their queues.
        self._retiring: set[asyncio.Task[None]] = set()
        self.config_path = config_path
        self.overrides: Overrides = overrides or {}
        self.reload_lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._emitter: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        self.supervisor = Supervisor()

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, url: str | None = None) -> str:
        url = url or self.config.nats.url
        if not url:
            conf = self.config.nats.server_config
            self._server = EmbeddedServer(
                self.config.nats.data_dir, extra_args=["-c", conf] if conf else None
            )
            url = await asyncio.to_thread(self._server.start)
            log.info("embedded nats-server on %s", url)
            # `autoglm health` (the container HEALTHCHECK) finds the server here.
            (Path(self.config.nats.data_dir) / "run" / "engine.url").write_text(url)
        self.url = url
        self._broker = NatsBroker(
            url,
            logger=None,
            error_cb=self._on_error,
            connect_timeout=int(self.config.nats.connect_timeout_s),
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            name="autoglm-engine",
            security=security_for(self.config.nats),
            # every reply to the engine (JetStream fetches, object chunks,
            # requests) arrives under this prefix, which --secure makes its own
            inbox_prefix=self.config.nats.inbox_prefix,
        )
        try:
            # nats-py keeps retrying the first connect when reconnects are
            # unlimited; bound it so a wrong URL fails fast and clearly.
            self._nc = await asyncio.wait_for(self._broker.connect(), self.config.nats.connect_timeout_s)
        except Exception as exc:  # nats-py raises OSError, TimeoutError, NoServersError...
            await self._stop_server()
            raise TransportError(f"cannot connect to NATS at {redact_url(url)}: {exc}") from exc
        try:
            await refuse_a_second_engine(self._nc, self.prefix, redact_url(url))
        except ConfigError:
            await self._broker.stop()
            await self._stop_server()
            raise
        for route in self.routes:
            self.launch_route(route)
        self.glm.start()
        for task in self.glm.tasks:
            self.supervisor.watch("glm-worker", task)
        self._emitter = self.supervisor.spawn("emit", self._emit_loop())
        if self.config.metrics.port is not None:
            self.metrics = MetricsServer(self, self.config.metrics.host, self.config.metrics.port)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics.host, self.metrics.port)
        self.service = await register(self, self._nc)
        self.claims = await claimcheck.setup(
            self._nc,
            self.config.nats.object_bucket,
            self.config.nats.object_ttl_s,
            self.limits.max_payload_bytes,
            timeout=self.config.nats.object_fetch_timeout_s,
            bucket_bytes=self.config.nats.object_max_bytes,
        )
        if await self._use_jetstream():
            self.intake = DurableIntake(self._nc, self.config.nats)
            self.intake.settle = self.idle
            await self.intake.setup()
            self._js = self.intake.js
            self.results = ResultStore(self._js, self._stored, self._send)
            self.results.start()
            self.supervisor.watch("result-store", self.results.task)
            self.intake.start(self._ingest, self._poison)
            for name, loop_task in self.intake.tasks.items():
                self.supervisor.watch(name, loop_task)
            log.info(
                "durable intake: stream %s, consumer %s", self.intake.in_stream, self.config.nats.consumer
            )
        else:
            self._sub = await self._nc.subscribe(
                f"{self.prefix}.in.>",
                cb=self._on_msg,
                pending_msgs_limit=PENDING_MSGS,
                pending_bytes_limit=1024 * 1024 * 1024,
            )
        await sync_with_server(self._nc)
        return url

    def launch_route(self, route: Route) -> None:
        """Give a route its model threads and a running batch worker."""
        pool = ThreadPoolExecutor(route.config.workers, thread_name_prefix=f"autoglm-{route.name}")
        worker = BatchWorker(
            route.batcher,
            lambda batch: self._run_batch(route, pool, batch),
            self._fail_batch,
            concurrency=route.config.workers,
        )
        worker.start()
        self.supervisor.watch(f"batch-{route.name}", worker.task)
        self._workers[id(route)] = (worker, pool)

    async def retire_route(self, route: Route) -> None:
        """Finish what a route has queued (its events still reach the aligner), then free it."""
        worker, pool = self._workers.pop(id(route))
        self.supervisor.release(worker.task)
        await worker.drain()
        await asyncio.to_thread(pool.shutdown, True)
        await asyncio.to_thread(route.close)

    async def reload(self) -> dict[str, Any]:
        """Re-read the routing file and swap what can change live (see engine/runtime/reload.py)."""
        from engine.runtime.reload import reload_from_file

        return await reload_from_file(self)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (a retiring route or GLM stage); :meth:`stop` waits for it."""
        task = asyncio.get_running_loop().create_task(work)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _use_jetstream(self) -> bool:
        if self.config.nats.durable is not None:
            return self.config.nats.durable
        try:
            await self._nc.jetstream().account_info()
        except Exception:  # no JetStream on this server (or not for this account)
            return False
        return True

    async def stop(self) -> None:
        """Stop intake, finish what is queued, flush every open window, publish, close."""
        if self._stopping:
            return
        self._stopping = self.supervisor.stopping = True
        self._stop_deadline = time.monotonic() + STOP_RETRY_S
        if self.intake is not None:
            await self.intake.stop_fetching()
        if self._sub is not None:
            await self._sub.drain()
        if self.service is not None:
            await self.service.stop()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for worker, _ in self._workers.values():
            await worker.drain()
        if self.intake is None:
            # Core mode: nothing would deliver these events again. Durable mode
            # leaves unfinished windows unacked instead: the next engine
            # rebuilds them whole, where publishing them now would split them.
            await self._publish(self.aligner.flush())
        if self._emitter is not None:
            self._kick.set()
            with contextlib.suppress(Exception):  # a dead emitter was reported when it died
                await self._emitter
        await self.glm.drain(self.config.glm.call_timeout_s)
        if self.results is not None:
            await self.results.drain()  # every stored result's inputs acked before we leave
        if self.intake is not None:
            await self.intake.close(clean=self.supervisor.failure is None)
        if self._nc is not None:
            await self._nc.flush()
        if self._broker is not None:
            await self._broker.stop()
        for _, pool in self._workers.values():
            pool.shutdown(wait=True)
        for route in self.routes:
            route.close()
        if self.metrics is not None:
            self.metrics.close()
        await asyncio.to_thread(self.tracing.shutdown)
        await self._stop_server()

    async def flush_windows(self) -> None:
        """End of stream: close and publish every open window now. For a caller
        that knows no more events will come (the demo, a bounded benchmark);
        a stop in durable mode does not, so that a restart rebuilds them whole."""
        await self._publish(self.aligner.flush())

    async def _stop_server(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
            self._server = None

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def idle(self) -> None:
        """Wait until every batch queue is empty (tests and the demo)."""
        for worker, _ in list(self._workers.values()):
            await worker.idle()

    # -- intake -------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            self.stats.slow_consumer += 1
        else:
            log.warning("NATS error: %s", exc)

    async def _on_msg(self, msg: Msg) -> None:
        await self._ingest(msg)

    async def _ingest(self, msg: Msg, default_id: str | None = None) -> Key | None:
        """Take one input message. Returns its key while it waits in a window
        (durable intake acks it once its result is stored), ``None`` once it
        is finished (rejected with a DLQ record).

        Nothing one message carries may stop intake: whatever goes wrong while
        handling it that is not a refusal (a bug, a library's surprise) becomes
        its DLQ record, reason ``internal_error``, and the loop goes on."""
        held: list[InputEvent] = []
        try:
            return await self._take(msg, default_id, held)
        except Exception as exc:
            self.stats.internal_errors += 1
            log.exception("internal error on %s", natsguard.printable(msg.subject))
            for event in held:  # admitted before the failure: free its slot
                with contextlib.suppress(KeyError):
                    self.aligner.discard(event.source, event.event_id)
            modality = self._modality_of(msg.subject)
            why = EventRejected("internal_error", f"{type(exc).__name__}: {exc}"[:500])
            await self._reject(msg.subject, _safe_headers(msg), why, modality, default_id)
            return None

    async def _poison(self, msg: Msg, default_id: str) -> None:
        """A message delivered ``nats.max_deliver`` times: its DLQ record, then it is ended."""
        modality = self._modality_of(msg.subject)
        why = EventRejected(
            "poison",
            f"delivered {self.config.nats.max_deliver} times without an outcome (nats.max_deliver); "
            "given up so it cannot block intake",
        )
        await self._reject(msg.subject, _safe_headers(msg), why, modality, default_id)

    async def _take(self, msg: Msg, default_id: str | None, held: list[InputEvent]) -> Key | None:
        now = self.clock()
        headers, data = msg.headers, msg.data
        if self._stored_before(None, default_id):
            return None  # its DLQ record was stored before a crash lost the ack
        try:
            if claimcheck.is_ref(headers):
                if self.claims is None:
                    raise EventRejected(
                        "object_missing", "an object reference, but this server has no JetStream"
                    )
                headers, data = await self.claims.resolve(headers or {}, data)
            event = decode_event(
                msg.subject,
                headers,
                data,
                prefix=self.prefix,
                limits=self.limits,
                received_ns=now,
                default_id=default_id,
            )
        except EventRejected as exc:
            modality = self._modality_of(msg.subject)
            self.stats.received[modality] += 1
            await self._reject(msg.subject, _safe_headers(msg), exc, modality, default_id)
            return None
        self.stats.received[event.modality] += 1
        key = (event.source, event.event_id)
        if self._stored_before(key, default_id):
            return None  # in a result stored before a crash lost its ack
        try:
            route = self.router.route_for(event)
            if route.limiter is not None and not route.limiter.allow(event.source, event.ts_ns):
                self.stats.rate_limited[event.modality] += 1
                self.aligner.skip(event, "rate_limited", admitted=False)
                return key  # listed in its window's result, acked with it
            self.aligner.admit(event)
        except EventRejected as exc:
            if exc.reason == "duplicate" and self.intake is not None and key in self.intake.held:
                return key  # a redelivery of an event still in a window: its newest copy is acked later
            if exc.reason == "duplicate":
                self.stats.duplicates[event.modality] += 1
            await self._reject(event.subject, _safe_headers(msg), exc, event.modality, default_id)
            return None
        held.append(event)
        worker = self._workers[id(route)][0]
        if route.config.intake == "complete" and len(route.batcher) >= route.batcher.max_queue:
            self.stats.intake_waits += 1
            # The backlog stays in NATS, nothing is dropped; and while intake
            # waits, quiet sources are not idle: their events are not read yet.
            self.aligner.pause_idle()
            self.supervisor.degrade("intake_waiting")
            try:
                await worker.wait_for_room()
            finally:
                self.aligner.resume_idle()
                self.supervisor.recover("intake_waiting")
        try:
            dropped = worker.submit(event)
        except BackpressureError as exc:
            await self._abandon(event, EventRejected("overloaded", str(exc)))
            return None
        if dropped is not None:
            await self._abandon(
                dropped, EventRejected("overloaded", f"dropped as the oldest in a full queue ({route.name})")
            )
        if self.aligner.has_ready:
            self._kick.set()
        return key

    def _modality_of(self, subject: str) -> str:
        """The modality token of a subject that may not parse (``?`` when it does not)."""
        return subject.rsplit(".", 1)[-1] if source_of(subject, self.prefix) else "?"

    def _stored_before(self, key: Key | None, default_id: str | None) -> bool:
        return (
            self.intake is not None and default_id is not None and self.intake.already_stored(key, default_id)
        )

    async def _abandon(self, event: InputEvent, exc: EventRejected) -> None:
        self.aligner.discard(event.source, event.event_id)
        await self._reject(event.subject, _event_headers(event), exc, event.modality, event.delivery)
        if self.intake is not None:
            await self.intake.ack((event.source, event.event_id))
        self._kick.set()

    async def _send(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> Any:
        """Durable mode: into the results stream, confirmed, retried with backoff
        for as long as the server is away (the inputs stay unacked and
        heartbeated meanwhile; ``health`` says ``degraded``); returns the
        PubAck. Core mode: fire and forget. Only a stopping engine gives up,
        after :data:`STOP_RETRY_S`: its inputs are then delivered again."""
        if self._js is None:
            await self._nc.publish(subject, payload, headers=headers)
            return None
        delay = 0.05
        retrying = False
        try:
            while True:
                try:
                    return await self._js.publish(subject, payload, headers=headers, timeout=2.0)
                except Exception as exc:  # no responders, timeout, reconnecting
                    if self._stopping and time.monotonic() > self._stop_deadline:
                        raise TransportError(f"could not store {subject} in JetStream: {exc}") from exc
                    if not retrying:
                        retrying = True
                        self.supervisor.degrade("store_retrying")
                        self.aligner.pause_idle()
                    self.stats.store_retries += 1
                    log.warning("storing %s failed (%s); retrying in %.2f s", subject, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)
        finally:
            if retrying:
                self.aligner.resume_idle()
                self.supervisor.recover("store_retrying")

    async def _reject(
        self,
        subject: str,
        headers: dict[str, str] | None,
        exc: EventRejected,
        modality: str,
        default_id: str | None = None,
    ) -> None:
        """Publish one DLQ record naming the subject, event id, reason and what was wrong."""
        self.stats.rejected[(modality, exc.reason)] += 1
        hdrs = headers or {}
        shown = natsguard.printable(subject)
        source = source_of(subject, self.prefix)
        record = {
            "subject": shown,
            "source": source,
            "modality": modality if modality != "?" else None,
            "event_id": header(hdrs, ID_HEADER),
            "timestamp_ns": header(hdrs, TIMESTAMP_HEADER),
            "reason": exc.reason,
            "message": exc.message,
            "rejected_ns": self.clock(),
        }
        log.info(
            "rejected %s: %s",
            shown,
            exc,
            extra={"source": source, "subject": shown, "reason": exc.reason},
        )
        target = dlq_subject(self.prefix, source)
        if exc.reason == "too_late" and self.config.aligner.late_to == "late" and source:
            target = f"{self.prefix}.late.{source}"
        dedup = None
        if self.intake is not None and default_id is not None and default_id.startswith("js"):
            dedup = {ID_HEADER: dlq_msg_id(self.intake.in_stream, int(default_id[2:]))}
        await self._send(target, orjson.dumps(record), headers=dedup)
        self.stats.dlq_published += 1

    # -- processing -----------------------------------------------------------------

    async def _run_batch(self, route: Route, pool: ThreadPoolExecutor, events: list[InputEvent]) -> None:
        if route.config.intake == "real_time":
            events = await self._skip_stale(route, events)
            if not events:
                return
        t0 = time.perf_counter_ns()
        outcomes = await asyncio.get_running_loop().run_in_executor(pool, route.process, events)
        took = time.perf_counter_ns() - t0
        while route.timings:
            decode_s, model_s = route.timings.popleft()
            self.stats.observe("decode", decode_s)
            self.stats.observe("model", model_s)
        for event, outcome in zip(events, outcomes, strict=True):
            if isinstance(outcome, EventRejected):
                await self._abandon(event, outcome)
            else:
                self.stats.processed[event.modality] += 1
                self.aligner.complete(event.source, event.event_id, outcome, took)
        self._kick.set()

    async def _skip_stale(self, route: Route, events: list[InputEvent]) -> list[InputEvent]:
        """``real_time``: drop what is already older than ``max_staleness_ms``, so a
        machine that is too slow falls behind by skipping, not by queueing."""
        limit = self.clock() - route.config.max_staleness_ms * 1_000_000
        fresh = [e for e in events if e.ts_ns >= limit]
        if len(fresh) < len(events):
            for event in events:
                if event.ts_ns < limit:
                    self.stats.stale[event.modality] += 1
                    # Listed in its window's result (and acked with it).
                    self.aligner.skip(event, "stale", admitted=True)
            self._kick.set()
        return fresh

    async def _fail_batch(self, events: list[InputEvent], exc: BaseException) -> None:
        self.stats.batch_errors += 1
        log.error(
            "batch of %d %s events failed: %s",
            len(events),
            events[0].modality,
            exc,
            exc_info=exc,
            extra={"source": events[0].source, "reason": "processor_error"},
        )
        for event in events:
            await self._abandon(event, EventRejected("processor_error", f"{type(exc).__name__}: {exc}"))

    # -- output ---------------------------------------------------------------------

    async def _emit_loop(self) -> None:
        tick = min(0.05, self.config.aligner.idle_timeout_ms / 4000)
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), tick)
            self._kick.clear()
            if natsguard.reader_dead(self._nc):
                self.supervisor.fail("nats-reader", "the NATS client stopped reading while connected")
            if self.intake is not None:
                self.supervisor.check_progress("jetstream-fetch", self.intake.last_turn, HUNG_AFTER_S)
            try:
                await self._publish(self.aligner.poll())
            except Exception:  # a bug here must not stop every later result
                self.stats.emit_errors += 1
                log.exception("publishing fused frames failed")

    async def _publish(self, frames: list[FusedFrame]) -> None:
        """Hand each closed frame to the GLM stage, which publishes it (now, or
        once the model answered) through :meth:`send_result`. In durable mode
        that does not wait for the store: :class:`ResultStore` confirms it."""
        for frame in frames:
            if frame.modalities:
                await self.glm.submit(frame, frame_record(frame))
            else:  # only skipped events: nothing to ask the model about
                record = frame_record(frame)
                record.update(prompt=None, answer=None, glm={"backend": self.config.glm.backend})
                await self.send_result(frame, record)

    async def send_result(self, frame: FusedFrame, record: dict[str, Any]) -> None:
        now = self.clock()
        latest = max((ts for f in frame.modalities.values() for ts in f.timestamps), default=now)
        record["latency_ms"] = lat = {
            "process": round(frame.process_ns / 1e6, 3),
            "align": round((frame.closed_ns - frame.first_arrival_ns) / 1e6, 3),
            "glm": record.get("glm", {}).get("latency_ms", 0.0),
            "event_to_result": round((now - latest) / 1e6, 3),
        }
        for stage, ms in lat.items():
            self.stats.observe(stage, ms / 1000)
        rid = record.get("result_id") or result_id(frame)
        headers = {ID_HEADER: rid}
        traceparent = self.tracing.frame_spans(frame, record, rid, now)
        if traceparent:
            headers["traceparent"] = traceparent
        subject, payload = f"{self.prefix}.out.{frame.source}", orjson.dumps(record)
        t0 = time.perf_counter()
        if self.results is not None:  # durable: acked once the server confirms the store
            keys = [(frame.source, eid) for eid in event_ids(frame)]
            await self.results.put(subject, payload, headers, keys)
        else:
            await self._send(subject, payload, headers=headers)
        self.stats.observe("publish", time.perf_counter() - t0)
        self.stats.results += 1
        for mod, fused in frame.modalities.items():
            self.stats.results_events[mod] += len(fused.event_ids)

    async def _stored(self, keys: list[Key]) -> None:
        assert self.intake is not None
        for key in keys:
            await self.intake.ack(key)


def _safe_headers(msg: Msg) -> dict[str, str] | None:
    """The message's headers for its DLQ record, or none when they cannot be read."""
    try:
        headers = msg.headers
    except Exception:  # nats-py parses lazily on some paths; never fail a rejection on it
        return None
    return headers if isinstance(headers, dict) else None


def _event_headers(event: InputEvent) -> dict[str, str]:
    """What a DLQ record of an admitted event names: its time and the engine's id
    for it (the producer's, or the one the transport gave)."""
    return {TIMESTAMP_HEADER: str(event.ts_ns), ID_HEADER: event.event_id}
