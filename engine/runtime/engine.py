"""The running engine, wiring only: NATS in, route -> batch -> process -> align -> GLM -> NATS out.

:class:`Engine` connects, picks the transport once (JetStream when the
server has it, core NATS otherwise, or what ``nats.durable`` says), builds
the sans-I/O :class:`~engine.pipeline.pipeline.Pipeline` and the
:class:`~engine.runtime.driver.Driver` that runs it, and starts the
observers, which read :meth:`Engine.snapshot`. What happens to an event is
decided in the pipeline; how it moves, in the transport.

FastStream's :class:`NatsBroker` owns the connection (lifecycle, reconnects,
callbacks); ingest and publishes use its nats-py client directly, because
FastStream's per-message machinery costs ~30x the throughput on this hot
path (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from faststream.nats import NatsBroker
from nats.errors import SlowConsumerError

from engine.align.aligner import Aligner
from engine.align.nearest import NearestAligner
from engine.config.models import EngineConfig, Overrides
from engine.contracts.errors import ConfigError, TransportError
from engine.contracts.subjects import Subjects
from engine.contracts.types import Clock, FusedFrame
from engine.glm.memory import Memory
from engine.glm.stage import GLMStage
from engine.observe.metrics import MetricsServer
from engine.observe.service import refuse_a_second_engine, register
from engine.observe.snapshot import GLMState, RouteState, Snapshot, copy_counts, copy_stats
from engine.observe.stats import EngineStats
from engine.observe.tracing import Tracing
from engine.pipeline.pipeline import Pipeline
from engine.pipeline.router import Route
from engine.runtime import reload as reloading
from engine.runtime.build import (
    build_aligner,
    build_glm_stage,
    build_memory,
    build_route,
    build_routes,
    build_tracing,
    build_trigger,
)
from engine.runtime.driver import HUNG_AFTER_S, Driver
from engine.runtime.server import EmbeddedServer
from engine.runtime.supervisor import Supervisor
from engine.transport.base import Transport, TransportState
from engine.transport.core import CoreTransport
from engine.transport.jetstream import JetStreamTransport
from engine.transport.security import redact_url, security_for, server_urls
from engine.transport.streams import replicas_for, slots
from engine.transport.sync import sync_with_server
from engine.wire import claimcheck, natsguard
from engine.wire.codec import Limits

log = logging.getLogger("autoglm.engine")

__all__ = ["Engine"]


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
        self.clock = clock
        self.tracing = tracing or build_tracing(config.tracing)
        self.supervisor = Supervisor()
        self.pipeline = Pipeline(
            routes or build_routes(config),
            build_aligner(config.aligner, clock),
            prefix=self.prefix,
            limits=Limits(max_payload_bytes=config.limits.max_payload_bytes),
            clock=clock,
            batch_clock=time.monotonic_ns,
            glm_backend=config.glm.backend,
            late_to=config.aligner.late_to,
            tracer=self.tracing.frame_spans,
            trigger=build_trigger(config.glm),
        )
        self.glm: GLMStage = build_glm_stage(config.glm, self._answered)
        self.url: str | None = None
        self.transport: Transport | None = None
        self.driver: Driver | None = None
        self.claims: claimcheck.ClaimChecks | None = None
        #: Durable mode: each source's GLM state, shared with the other workers.
        self.memory: Memory | None = None
        self.metrics: MetricsServer | None = None
        self.service: Any = None
        self.config_path = config_path
        self.overrides: Overrides = overrides or {}
        self.reload_lock = asyncio.Lock()
        #: GLM stages replaced by a reload, finishing their calls.
        self._retiring: set[asyncio.Task[None]] = set()
        self._server: EmbeddedServer | None = None
        self._broker: NatsBroker | None = None
        self._nc: Any = None
        self._stopping = False

    # -- what observers and tests read ----------------------------------------------

    @property
    def stats(self) -> EngineStats:
        return self.pipeline.stats

    @property
    def routes(self) -> list[Route]:
        return self.pipeline.routes

    @property
    def aligner(self) -> Aligner | NearestAligner:
        return self.pipeline.aligner

    def snapshot(self) -> Snapshot:
        """An immutable copy of the counters and state, for observers."""
        t = self.transport.state() if self.transport is not None else None
        stats = copy_stats(self.pipeline.stats)
        if t is not None:  # kept in the stats' shape that `autoglm status` shows
            stats.slow_consumer, stats.store_retries = t.slow_consumer, t.store_retries
        a, g = self.pipeline.aligner, self.glm
        per_source = self.config.metrics.per_source
        return Snapshot(
            prefix=self.prefix,
            stats=stats,
            aligner=copy_counts(a.counts),
            per_source={n: copy_counts(a.source_counts(n)) for n in a.source_names()} if per_source else {},
            open_windows=a.open_windows,
            routes=tuple(
                RouteState(
                    name=f"{r.config.modality}:{r.config.processor}",
                    sizes=dict(r.batcher.stats.sizes),
                    items=r.batcher.stats.items,
                    wait=copy.deepcopy(r.batcher.stats.wait),
                    depth=len(r.batcher),
                    dropped=r.batcher.stats.dropped + r.batcher.stats.rejected,
                    faults=dict(getattr(r.processor, "faults", {})),
                    counters=dict(getattr(r.processor, "counters", {})),
                    variants=tuple(v.state() for v in r.variants),
                )
                for r in self.pipeline.routes
            ),
            glm=GLMState(
                backend=g.config.backend,
                calls=g.stats.calls,
                errors=g.stats.errors,
                answered=g.stats.answered,
                skipped=dict(g.stats.skipped or {}),
                queued=g.queued,
                breaker=g.breaker.state,
            ),
            transport=t if t is not None else TransportState(durable=False),
            health=self.supervisor.report(),
            config_json=self.config.model_dump_json(),
            per_source_metrics=per_source,
            slots=tuple(s.name for s in slots(self.config.nats)) if t is not None and t.worker else (),
        )

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, url: str | None = None) -> str:
        """Connect, set the transport up, start everything; returns the NATS URL.
        A start that fails half way undoes what it started and raises."""
        try:
            return await self._start(url)
        except BaseException:
            await self._abort()
            raise

    async def _abort(self) -> None:
        self._stopping = self.supervisor.stopping = True  # what is cancelled now did not fail
        if self.driver is not None:
            with contextlib.suppress(Exception):
                await self.driver.stop()
        if self.transport is not None:
            with contextlib.suppress(Exception):
                await self.transport.stop_intake()
        for task in self.glm.tasks:
            task.cancel()
        if self.memory is not None and self.memory.task is not None:
            self.memory.task.cancel()
        if self.service is not None:
            with contextlib.suppress(Exception):
                await self.service.stop()
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await self._broker.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self.driver is not None:
            await self.driver.close()
        else:
            for route in self.pipeline.routes:
                await asyncio.to_thread(route.close)
        await self._stop_server()

    async def _start(self, url: str | None) -> str:
        url = url or self.config.nats.url
        if not url:
            conf = self.config.nats.server_config
            self._server = EmbeddedServer(
                self.config.nats.data_dir,
                extra_args=["-c", conf] if conf else None,
                # A terminal's Ctrl-C reaches the whole group: the server must
                # outlive the signal until the engine has drained into it.
                own_group=True,
                mappings=dict([Subjects(self.prefix).partition_transform(self.config.nats.partitions)])
                if self.config.nats.partitions > 1 and self.config.nats.durable is False
                else None,
            )
            url = await asyncio.to_thread(self._server.start)
            log.info("embedded nats-server on %s", url)
            # `autoglm health` (the container HEALTHCHECK) finds the server here.
            (Path(self.config.nats.data_dir) / "run" / "engine.url").write_text(url)
        self.url = url
        await self._connect(url)
        nats = self.config.nats
        replicas = await replicas_for(self._nc, nats)
        self.claims = await claimcheck.setup(
            self._nc,
            nats.object_bucket,
            nats.object_ttl_s,
            self.config.limits.max_payload_bytes,
            timeout=nats.object_fetch_timeout_s,
            bucket_bytes=nats.object_max_bytes,
            replicas=replicas,
        )
        transport: Transport
        if await self._use_jetstream():
            transport = JetStreamTransport(self._nc, nats, replicas=replicas)
        elif nats.partitions > 1:
            if not await self._has_jetstream():
                raise ConfigError(
                    [
                        f"nats.partitions = {nats.partitions}: workers own partitions by lease in a KV "
                        "bucket, and this server has no JetStream; enable it, or set nats.partitions = 1"
                    ]
                )
            transport = CoreTransport(self._nc, Subjects(self.prefix).inputs, config=nats, replicas=replicas)
        else:
            # Without leases, one engine per prefix (a second would split
            # sources' windows between two aligners).
            await refuse_a_second_engine(self._nc, self.prefix, redact_url(url))
            transport = CoreTransport(self._nc, Subjects(self.prefix).inputs)
        await transport.setup()
        self.transport = transport
        if transport.durable:
            self.memory = await build_memory(
                self._nc, self.config, lambda: self.pipeline.trigger, lambda: self.glm
            )
        self.pipeline.stored_before = transport.stored_before
        driver = self.driver = Driver(
            self.pipeline,
            transport,
            self.glm,
            self.supervisor,
            claims=self.claims,
            idle_timeout_ms=self.config.aligner.idle_timeout_ms,
            memory=self.memory,
        )
        driver.checks.append(self._check)
        self.glm.publish = driver.answered  # straight to the driver from now on
        driver.start()
        self.glm.start()
        if self.memory is not None:
            self.memory.start()
            self.supervisor.watch("glm-memory", self.memory.task)
        for task in self.glm.tasks:
            self.supervisor.watch("glm-worker", task)
        if self.config.metrics.port is not None:
            self.metrics = MetricsServer(self.snapshot, self.config.metrics.host, self.config.metrics.port)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics.host, self.metrics.port)
        self.service = await register(self._nc, self.snapshot, self.reload)
        if isinstance(transport, JetStreamTransport):
            transport.watch, transport.unwatch = self.supervisor.watch, self.supervisor.release
        await transport.start(driver)
        for name, loop_task in transport.tasks.items():
            if loop_task is not None:
                self.supervisor.watch(name, loop_task)
        if transport.durable:
            log.info("durable intake: JetStream consumer %s", nats.consumer)
        await sync_with_server(self._nc)
        return url

    async def _connect(self, url: str) -> None:
        self._broker = NatsBroker(
            server_urls(url),  # a cluster's nodes: it moves to another when one goes
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

    async def _use_jetstream(self) -> bool:
        if self.config.nats.durable is not None:
            return self.config.nats.durable
        return await self._has_jetstream()

    async def _has_jetstream(self) -> bool:
        try:
            await self._nc.jetstream().account_info()
        except Exception:  # no JetStream on this server (or not for this account)
            return False
        return True

    def _check(self) -> None:
        """Each turn of the driver: is the connection still read, is intake still turning?"""
        if natsguard.reader_dead(self._nc):
            self.supervisor.fail("nats-reader", "the NATS client stopped reading while connected")
        last = self.transport.last_turn if self.transport is not None else None
        if last is not None:
            self.supervisor.check_progress("jetstream-fetch", last, HUNG_AFTER_S)

    async def stop(self) -> None:
        """Stop intake, finish what is queued, publish, close. Core mode flushes
        every open window (nothing would deliver those events again); durable
        mode leaves them unacked, so the next engine rebuilds them whole."""
        if self._stopping:
            return
        self._stopping = self.supervisor.stopping = True
        if self.transport is not None:
            await self.transport.stop_intake()
        if self.service is not None:
            await self.service.stop()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self.driver is not None:
            await self.driver.drain()
            if self.transport is not None and not self.transport.durable:
                await self.driver.flush()
            await self.driver.stop()
        await self.glm.drain(self.config.glm.call_timeout_s)
        if self.memory is not None:  # before the leases go: the next owner reads it
            await self.memory.close()
        if self.transport is not None:
            await self.transport.drain()
            await self.transport.close(clean=self.supervisor.failure is None)
        if self._nc is not None:
            await self._nc.flush()
        if self._broker is not None:
            await self._broker.stop()
        if self.driver is not None:
            await self.driver.close()
        else:
            for route in self.pipeline.routes:
                route.close()
        if self.metrics is not None:
            self.metrics.close()
        await asyncio.to_thread(self.tracing.shutdown)
        await self._stop_server()

    async def flush_windows(self) -> None:
        """End of stream: close and publish every open window now. For a caller
        that knows no more events will come (the demo, a bounded benchmark);
        a stop in durable mode does not, so that a restart rebuilds them whole."""
        if self.driver is not None:
            await self.driver.flush()

    async def idle(self) -> None:
        """Wait until nothing is queued or being processed (tests and the demo)."""
        if self.driver is not None:
            await self.driver.idle()

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

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            if self.transport is not None:
                self.transport.slow_consumer()
        else:
            log.warning("NATS error: %s", exc)

    async def _answered(self, frame: FusedFrame, record: dict[str, Any]) -> None:
        """The GLM stage's publish callback (a stage may answer after a reload replaced it)."""
        if self.driver is None:
            raise TransportError("the engine is not started")
        await self.driver.answered(frame, record)

    # -- reload ---------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read the routing file and swap what can change live (see engine/runtime/reload.py)."""
        if self.config_path is None:
            return reloading.refused(["this engine was not started from a routing file"])
        async with self.reload_lock:
            try:
                new = await reloading.read(self.config_path, self.overrides)
                # Reused when unchanged, within its own route only: two routes never
                # share one model instance (nor does retiring one free the other's).
                loaded = {r.name: r.variants for r in self.pipeline.routes}
                change = await reloading.prepare(
                    self.config,
                    self.pipeline.routes,
                    new,
                    lambda cfg, i: build_route(cfg.routes[i], f"routes[{i}]", loaded.get(f"routes[{i}]", ())),
                    lambda cfg: build_glm_stage(cfg.glm, self._answered),
                )
            except ConfigError as exc:
                self.stats.reloads_failed += 1
                log.error("reload of %s refused: %s", self.config_path, "; ".join(exc.problems))
                return reloading.refused(list(exc.problems))
            except Exception as exc:  # processor/model construction: refuse, keep running
                self.stats.reloads_failed += 1
                log.error("reload refused: %s", exc)
                return reloading.refused([f"{type(exc).__name__}: {exc}"])
            self.swap(change)
            log.warning("reloaded %s: %s", self.config_path, change.report)
            return change.report

    def swap(self, change: reloading.Change) -> None:
        """Swap a prepared reload in, in one step on the loop: new events go to the
        new routes while the replaced ones finish their queues (their events reach
        the same aligner); a replaced GLM stage finishes its calls in the background."""
        for route in change.built:
            if self.driver is not None:
                self.driver.add_route(route)
        self.pipeline.swap_routes(change.routes)
        self.pipeline.limits = Limits(max_payload_bytes=change.config.limits.max_payload_bytes)
        if self.claims is not None:
            self.claims.max_bytes = change.config.limits.max_payload_bytes
        if change.stage is not None:
            self.pipeline.swap_trigger(build_trigger(change.config.glm))
            old_stage, self.glm = self.glm, change.stage
            change.stage.adopt(old_stage)
            change.stage.start()
            if self.driver is not None:
                self.driver.glm = change.stage
            for task in change.stage.tasks:
                self.supervisor.watch("glm-worker", task)
            for task in old_stage.tasks:
                self.supervisor.release(task)
            work = asyncio.get_running_loop().create_task(old_stage.drain(self.config.glm.call_timeout_s))
            self._retiring.add(work)
            work.add_done_callback(self._retiring.discard)
        self.pipeline.glm_backend = change.config.glm.backend
        self.config = change.config
        self.stats.reloads += 1
