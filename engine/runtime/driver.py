"""The live driver: runs the sans-I/O pipeline on an asyncio loop.

It is the pipeline's caller (see :mod:`engine.pipeline.pipeline`): it takes
messages from the transport (resolving claim checks first), runs due
batches on each route's model threads, closes windows on a timer, hands
frames to the GLM stage and every record to the transport. It owns no
policy: what to publish, when a batch is due and what an event turned into
are the pipeline's answers.

With a :class:`~engine.glm.memory.Memory` (durable mode) it also tells the
memory what happens to each source's GLM state: a source's first event here
starts reading its state, windows close only once those reads are in, sent
frames and answers are written behind, and a handover lets the sources go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.contracts.errors import EventRejected
from engine.contracts.messages import Finish, Message, Publish
from engine.contracts.types import FusedFrame
from engine.glm.memory import Memory
from engine.glm.stage import GLMStage
from engine.pipeline.pipeline import Ask, Batch, Output, Pipeline
from engine.pipeline.router import Route
from engine.runtime.supervisor import Supervisor
from engine.transport.base import Transport
from engine.wire import claimcheck

log = logging.getLogger("autoglm.engine")

#: Seconds the intake loop may spend on one message (with no reason such as a
#: store retrying or a full queue) before the engine counts itself hung and
#: exits for a fresh start. Claim-check fetches are bounded well below it.
HUNG_AFTER_S = 60.0


class Driver:
    """Feeds the pipeline, runs its batches and publishes what it returns."""

    def __init__(
        self,
        pipeline: Pipeline,
        transport: Transport,
        glm: GLMStage,
        supervisor: Supervisor,
        *,
        claims: claimcheck.ClaimChecks | None,
        idle_timeout_ms: int,
        memory: Memory | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.transport = transport
        self.glm = glm
        self.supervisor = supervisor
        self.claims = claims
        self.memory = memory
        self.tick = min(0.05, idle_timeout_ms / 4000)
        #: id(route) -> the threads its batches run on.
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._kick = asyncio.Event()
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        #: A record could not be published, and none has been since (health: degraded).
        self._publish_failing = False
        self._idle.set()
        self._pump: asyncio.Task[None] | None = None
        self._stopping = False
        #: Called each turn of the pump (the engine's liveness checks).
        self.checks: list[Callable[[], None]] = []

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        for route in self.pipeline.routes:
            self.add_route(route)
        self._pump = self.supervisor.spawn("emit", self._loop())

    def add_route(self, route: Route) -> None:
        """Give a route its model threads."""
        self._pools[id(route)] = ThreadPoolExecutor(
            route.config.workers, thread_name_prefix=f"autoglm-{route.name}"
        )

    async def drain(self) -> None:
        """Run everything queued through its processors and wait for it."""
        while True:
            self._dispatch(force=True)
            if not self._running:
                break
            await asyncio.gather(*list(self._running), return_exceptions=True)
        await self._free_retired()
        await asyncio.gather(*list(self._running), return_exceptions=True)  # the routes freed

    async def stop(self) -> None:
        """Stop the pump (after :meth:`drain`)."""
        self._stopping = True
        if self._pump is not None:
            self._kick.set()
            with contextlib.suppress(Exception):  # a dead pump was reported when it died
                await self._pump

    async def close(self) -> None:
        for pool in self._pools.values():
            await asyncio.to_thread(pool.shutdown, True)
        self._pools.clear()
        for route in (*self.pipeline.routes, *self.pipeline.retiring):
            await asyncio.to_thread(route.close)

    async def idle(self) -> None:
        """Wait until nothing is queued or being processed (tests, the demo)."""
        while self.pipeline.busy() or self._running:
            self._idle.clear()
            self._kick.set()
            await self._idle.wait()

    # -- intake (the transport's sink) ---------------------------------------------

    async def message(self, msg: Message) -> None:
        if self.memory is not None:
            self._recall(msg.subject)
        if claimcheck.is_ref(msg.headers):
            try:
                if self.claims is None:
                    raise EventRejected(
                        "object_missing", "an object reference, but this server has no JetStream"
                    )
                headers, data = await self.claims.resolve(dict(msg.headers or {}), msg.data)
                msg = Message(msg.subject, headers, data, msg.delivery)
            except EventRejected as exc:
                await self.emit([self.pipeline.refuse(msg, exc)])
                return
            except Exception as exc:  # the pipeline's rule: one message never stops intake
                why = EventRejected("internal_error", f"{type(exc).__name__}: {exc}"[:500])
                self.pipeline.stats.internal_errors += 1
                await self.emit([self.pipeline.refuse(msg, why)])
                return
        # Several intakes call in at once (one fetch loop per partition): while
        # another's event is parked, receiving this one would park it over that
        # one, which would then never be processed (nor its window closed).
        # Nothing awaits between this wait and ``receive``.
        await self._wait_for_room()
        await self.emit(self.pipeline.receive(msg))
        await self._wait_for_room()
        self._kick.set()  # a batch or a window may be due now

    async def _wait_for_room(self) -> None:
        """While a ``complete`` route's queue is full (an event parked), intake waits."""
        if not self.pipeline.paused:
            return
        self.supervisor.degrade("intake_waiting")
        try:
            while self.pipeline.paused:
                self._room.clear()
                self._kick.set()
                await self._room.wait()
        finally:
            self.supervisor.recover("intake_waiting")

    def _recall(self, subject: str) -> None:
        """A source's first event here: start reading its GLM state (not awaited)."""
        assert self.memory is not None
        source = subject.rpartition(".")[0].rpartition(".")[2]  # ...<source>.<modality>
        if self.memory.knows(source) or not self.memory.active:
            return
        if self.pipeline.subjects.source_of(subject) == source:  # a subject that parses
            self.memory.recall(source)

    async def _closing(self) -> None:
        """Windows are about to close: the sources' states being read are in."""
        if self.memory is not None and self.memory.loading:
            await self.memory.settle()

    async def poison(self, msg: Message, delivered: int) -> None:
        why = EventRejected(
            "poison",
            f"delivered {delivered} times without an outcome (nats.max_deliver); "
            "given up so it cannot block intake",
        )
        await self.emit([self.pipeline.refuse(msg, why, received=False)])

    async def refuse(self, msg: Message, why: EventRejected) -> None:
        await self.emit([self.pipeline.refuse(msg, why)])

    async def settle(self) -> None:
        await self.idle()

    def trouble(self, reason: str, active: bool) -> None:
        if active:
            self.supervisor.degrade(reason)
            self.pipeline.pause_idle()
        else:
            self.pipeline.resume_idle()
            self.supervisor.recover(reason)

    async def release(self, owns: Callable[[str], bool], *, finish: bool = False) -> list[str]:
        # Quiet sources must not close early while their partition is handed over.
        self.pipeline.pause_idle()
        try:
            while self.pipeline.pending_of(owns):
                self._dispatch(force=True)
                if self._running:
                    await asyncio.wait(set(self._running), return_when=asyncio.FIRST_COMPLETED)
                else:  # a parked event waits for the pump to make room
                    self._kick.set()
                    await asyncio.sleep(self.tick)
            await self._closing()
            if finish:
                self.pipeline.close_sources(owns)
            await self.emit(self.pipeline.poll())
            if self.memory is None:
                return self.pipeline.release(owns)
            left = self.memory.leave(owns)  # before the trigger forgets their snapshots
            given = self.pipeline.release(owns)
            await self.memory.written(left)  # the next owner reads them
            return given
        finally:
            self.pipeline.resume_idle()

    # -- the pump -------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            timeout = self.tick
            due = self.pipeline.until_due()
            if due is not None:
                timeout = min(timeout, due / 1e9)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout)
            self._kick.clear()
            for check in self.checks:
                check()
            try:
                self._dispatch()
                # Every turn: a quiet source's window closes on its idle timeout,
                # which no event announces.
                await self._closing()
                await self.emit(self.pipeline.poll())
                await self._free_retired()
            except Exception:  # a bug here must not stop every later result
                self.pipeline.stats.emit_errors += 1
                log.exception("publishing fused frames failed")
            if not self.pipeline.busy() and not self._running:
                self._idle.set()

    def _dispatch(self, *, force: bool = False) -> None:
        batches = self.pipeline.batches(force=force)
        if batches or not self.pipeline.paused:
            self._room.set()
        for batch in batches:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: Batch) -> None:
        pool = self._pools[id(batch.route)]
        t0 = time.perf_counter_ns()
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                pool, batch.route.process, batch.events
            )
        except Exception as exc:
            outputs = self.pipeline.batch_failed(batch, exc)
        else:
            outputs = self.pipeline.batch_done(batch, outcomes, time.perf_counter_ns() - t0)
        try:
            await self.emit(outputs)
        except Exception:  # not supervised: say so, and keep the pump going
            self.pipeline.stats.emit_errors += 1
            log.exception("publishing the outcome of a batch failed")
        finally:
            self._kick.set()

    async def _free_retired(self) -> None:
        """Free replaced routes in the background: a slow model unload must not
        hold up batches and windows."""
        for route in self.pipeline.retired():
            task = asyncio.get_running_loop().create_task(self._free(route))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _free(self, route: Route) -> None:
        pool = self._pools.pop(id(route), None)
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True)
        await asyncio.to_thread(route.close)

    # -- output ---------------------------------------------------------------------

    async def emit(self, outputs: list[Output]) -> None:
        """Each output on its own: one that fails (counted, logged) must not take
        the others of its poll with it, and the deliveries of a record that could
        not be published are given back, to be delivered again, not held forever."""
        for out in outputs:
            try:
                await self._emit_one(out)
            except Exception:
                self.pipeline.stats.emit_errors += 1
                log.exception("publishing a %s failed", type(out).__name__)
                self.transport.give_back(
                    self.pipeline.give_up(out.frame) if isinstance(out, Ask) else out.acks
                )

    async def _emit_one(self, out: Output) -> None:
        if isinstance(out, Ask):
            if self.memory is not None and out.skip is None and self.pipeline.trigger is not None:
                self.memory.changed(out.frame.source)  # the trigger's new reference
            # The stage fills in prompt, answer and glm (see :meth:`answered`).
            await self.glm.submit(out.frame, {}, out.skip)
        elif isinstance(out, Finish):
            await self.transport.finish(out)
        else:
            await self.publish(out)

    async def publish(self, out: Publish) -> None:
        t0 = time.perf_counter()
        try:
            await self.transport.publish(out)
        except Exception:
            # Held, its inputs would be heartbeated forever: given back, they
            # are delivered again (the GLM stage's answers come this way too).
            self.transport.give_back(out.acks)
            self._publishing(ok=False)
            raise
        self._publishing(ok=True)
        if out.kind == "result":
            self.pipeline.stats.observe("publish", time.perf_counter() - t0)

    def _publishing(self, *, ok: bool) -> None:
        """Health says ``degraded: publish_failing`` from a record that could not
        be published until the next one that could: an engine that drops what
        it makes must not answer "ok"."""
        if ok == (not self._publish_failing):
            return
        self._publish_failing = not ok
        if ok:
            self.supervisor.recover("publish_failing")
        else:
            self.supervisor.degrade("publish_failing")

    async def answered(self, frame: FusedFrame, record: dict[str, Any]) -> None:
        """The GLM stage's publish callback: the frame's finished result."""
        if self.memory is not None and record.get("answer") is not None and self.glm.config.history:
            self.memory.changed(frame.source)  # the answer went into its history
        await self.publish(self.pipeline.result(frame, record))

    async def flush(self) -> None:
        """Close and publish every open window now."""
        await self._closing()
        await self.emit(self.pipeline.flush())
