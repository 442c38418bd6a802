"""The running engine: NATS in, route -> batch -> process -> align -> GLM -> NATS out.

FastStream's :class:`NatsBroker` owns the connection (lifecycle, reconnects,
callbacks); the ingest subscription and the result publishes use its nats-py
client directly, because FastStream's per-message machinery costs ~30x the
throughput on this hot path (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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

from engine import claimcheck
from engine.aligner import Aligner
from engine.batcher import BatchWorker
from engine.codec import ID_HEADER, TIMESTAMP_HEADER, Limits, decode_event, dlq_subject, source_of
from engine.config import EngineConfig, Overrides
from engine.discovery import refuse_a_second_engine, register
from engine.durable import DurableIntake, Key, ResultStore
from engine.errors import BackpressureError, ConfigError, EventRejected, TransportError
from engine.glm_stage import GLMStage
from engine.metrics import MetricsServer
from engine.nearest import NearestAligner
from engine.publish import sync_with_server
from engine.router import Route, Router
from engine.security import redact_url, security_for
from engine.server import EmbeddedServer
from engine.stats import EngineStats
from engine.tracing import Tracing
from engine.types import Clock, FusedFrame, InputEvent

log = logging.getLogger("autoglm.engine")

#: Messages nats-py may buffer for our ingest subscription before it reports a
#: slow consumer (and drops, which we count).
PENDING_MSGS = 200_000


def trace_id_of(frame: FusedFrame) -> str:
    """The producer's W3C trace id, or one derived from the window (stable
    across a rebuild of the same window, unlike a random one)."""
    if frame.traceparent:
        return frame.traceparent.split("-")[1]
    return hashlib.sha256(f"{frame.source}:{frame.start_ns}".encode()).hexdigest()[:32]


def frame_record(frame: FusedFrame) -> dict[str, Any]:
    """The deterministic part of a result: same events + same clock -> same bytes."""
    return {
        "source": frame.source,
        "window": {"start_ns": frame.start_ns, "end_ns": frame.end_ns},
        "events": {m: list(f.event_ids) for m, f in frame.modalities.items()},
        "missing": list(frame.missing),
        "features": {m: dict(f.summary) for m, f in frame.modalities.items()},
        "trace_id": trace_id_of(frame),
    }


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
        self.config = config
        self.prefix = config.nats.subject_prefix
        self.limits = Limits(max_payload_bytes=config.limits.max_payload_bytes)
        self.clock = clock
        self.routes = routes or [rc.build(f"routes[{i}]") for i, rc in enumerate(config.routes)]
        self.router = Router(self.routes)
        self.aligner: Aligner | NearestAligner = config.aligner.build(clock)
        self.glm: GLMStage = config.glm.build(self.send_result)
        self.stats = EngineStats()
        self.tracing = tracing or config.tracing.build()
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
        self._emitter = asyncio.get_running_loop().create_task(self._emit_loop())
        if self.config.metrics.port is not None:
            self.metrics = MetricsServer(self, self.config.metrics.host, self.config.metrics.port)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics.host, self.metrics.port)
        self.service = await register(self, self._nc)
        self.claims = await claimcheck.setup(
            self._nc,
            self.config.nats.object_bucket,
            self.config.nats.object_ttl_s,
            self.limits.max_payload_bytes,
        )
        if await self._use_jetstream():
            self.intake = DurableIntake(self._nc, self.config.nats)
            await self.intake.setup()
            self._js = self.intake.js
            self.results = ResultStore(self._js, self._stored, self._send)
            self.results.start()
            self.intake.start(self._ingest)
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
        self._workers[id(route)] = (worker, pool)

    async def retire_route(self, route: Route) -> None:
        """Finish what a route has queued (its events still reach the aligner), then free it."""
        worker, pool = self._workers.pop(id(route))
        await worker.drain()
        await asyncio.to_thread(pool.shutdown, True)
        await asyncio.to_thread(route.close)

    async def reload(self) -> dict[str, Any]:
        """Re-read the routing file and swap what can change live (see engine/reload.py)."""
        from engine.reload import reload_from_file

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
        self._stopping = True
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
        await self._publish(self.aligner.flush())
        if self._emitter is not None:
            self._kick.set()
            await self._emitter
        await self.glm.drain(self.config.glm.call_timeout_s)
        if self.results is not None:
            await self.results.drain()  # every stored result's inputs acked before we leave
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
        is finished (rejected with a DLQ record, or rate-limited)."""
        now = self.clock()
        headers, data = msg.headers, msg.data
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
            modality = msg.subject.rsplit(".", 1)[-1] if source_of(msg.subject, self.prefix) else "?"
            self.stats.received[modality] += 1
            await self._reject(msg.subject, msg.headers, exc, modality)
            return None
        self.stats.received[event.modality] += 1
        key = (event.source, event.event_id)
        try:
            route = self.router.route_for(event)
            if route.limiter is not None and not route.limiter.allow(event.source, event.ts_ns):
                self.stats.rate_limited[event.modality] += 1
                self.aligner.note(event.source, event.modality, "rate_limited")
                return None
            self.aligner.admit(event)
        except EventRejected as exc:
            if exc.reason == "duplicate" and self.intake is not None and key in self.intake.held:
                return key  # a redelivery of an event still in a window: its newest copy is acked later
            await self._reject(event.subject, msg.headers, exc, event.modality)
            return None
        worker = self._workers[id(route)][0]
        if route.config.intake == "complete" and len(route.batcher) >= route.batcher.max_queue:
            self.stats.intake_waits += 1
            await worker.wait_for_room()  # the backlog stays in NATS, nothing is dropped
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

    async def _abandon(self, event: InputEvent, exc: EventRejected) -> None:
        self.aligner.discard(event.source, event.event_id)
        await self._reject(event.subject, _event_headers(event), exc, event.modality)
        if self.intake is not None:
            await self.intake.ack((event.source, event.event_id))
        self._kick.set()

    async def _send(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Durable mode: into the results stream, confirmed, retried while the
        server is away (the inputs stay unacked meanwhile); core mode: fire
        and forget."""
        if self._js is None:
            await self._nc.publish(subject, payload, headers=headers)
            return
        deadline = time.monotonic() + self.config.nats.ack_wait_s
        delay = 0.05
        while True:
            try:
                await self._js.publish(subject, payload, headers=headers, timeout=2.0)
                return
            except Exception as exc:  # no responders, timeout, reconnecting
                if time.monotonic() > deadline:
                    raise TransportError(f"could not store {subject} in JetStream: {exc}") from exc
                log.warning("storing %s failed (%s); retrying", subject, exc)
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def _reject(
        self, subject: str, headers: dict[str, str] | None, exc: EventRejected, modality: str
    ) -> None:
        """Publish one DLQ record naming the subject, event id, reason and what was wrong."""
        self.stats.rejected[(modality, exc.reason)] += 1
        hdrs = headers or {}
        source = source_of(subject, self.prefix)
        record = {
            "subject": subject,
            "source": source,
            "modality": modality if modality != "?" else None,
            "event_id": hdrs.get(ID_HEADER),
            "timestamp_ns": hdrs.get(TIMESTAMP_HEADER),
            "reason": exc.reason,
            "message": exc.message,
            "rejected_ns": self.clock(),
        }
        log.info(
            "rejected %s: %s",
            subject,
            exc,
            extra={"source": source, "subject": subject, "reason": exc.reason},
        )
        target = dlq_subject(self.prefix, source)
        if exc.reason == "too_late" and self.config.aligner.late_to == "late" and source:
            target = f"{self.prefix}.late.{source}"
        await self._send(target, orjson.dumps(record))
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
                    self.aligner.note(event.source, event.modality, "stale")
                    self.aligner.discard(event.source, event.event_id)
                    if self.intake is not None:
                        await self.intake.ack((event.source, event.event_id))
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
            await self.glm.submit(frame, frame_record(frame))

    async def send_result(self, frame: FusedFrame, record: dict[str, Any]) -> None:
        now = self.clock()
        latest = max(ts for f in frame.modalities.values() for ts in f.timestamps)
        record["latency_ms"] = lat = {
            "process": round(frame.process_ns / 1e6, 3),
            "align": round((frame.closed_ns - frame.first_arrival_ns) / 1e6, 3),
            "glm": record.get("glm", {}).get("latency_ms", 0.0),
            "event_to_result": round((now - latest) / 1e6, 3),
        }
        for stage, ms in lat.items():
            self.stats.observe(stage, ms / 1000)
        result_id = frame.key or f"{frame.source}:{frame.start_ns}"
        headers = {ID_HEADER: result_id}
        traceparent = self.tracing.frame_spans(frame, record, result_id, now)
        if traceparent:
            headers["traceparent"] = traceparent
        subject, payload = f"{self.prefix}.out.{frame.source}", orjson.dumps(record)
        t0 = time.perf_counter()
        if self.results is not None:  # durable: acked once the server confirms the store
            keys = [(frame.source, eid) for f in frame.modalities.values() for eid in f.event_ids]
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


def _event_headers(event: InputEvent) -> dict[str, str]:
    hdrs = {TIMESTAMP_HEADER: str(event.ts_ns)}
    if not event.generated_id:
        hdrs[ID_HEADER] = event.event_id
    return hdrs
