"""The engine's GLM stage: fused frame -> prompt -> answer, never blocking intake.

Frames wait in a bounded queue (``max_queue``, overload ``drop_oldest`` by
default) in front of ``max_in_flight`` workers; a call has a deadline
(``call_timeout_s``) and a circuit breaker stops calling a failing backend
for a cool-down. Every frame is published exactly once: with an answer, with
``glm.error``, or with ``glm.skipped`` saying why (``no_change``,
``glm_overloaded``, ``breaker_open``, ``shutdown``).

With ``trigger = "on_change"`` a frame is sent to the model only when it
differs enough from the last frame that was, or ``max_interval_ms`` of event
time has passed (:mod:`engine.glm.trigger`).

Time is the injected :data:`~engine.contracts.types.Clock` (integer
nanoseconds, monotonic by default); config's seconds are converted once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.contracts.errors import GLMError
from engine.contracts.records import trace_id_of
from engine.contracts.types import Clock, FusedFrame
from engine.glm.client import AutoGLM, CircuitBreaker, TransformersBackend
from engine.glm.prompts import Answer, History, PromptTemplate, prompt_values
from engine.glm.trigger import Verdict

if TYPE_CHECKING:
    from engine.config.models import GLMConfig

log = logging.getLogger("autoglm.glm")

#: Publishes one finished result record for a frame.
Publish = Callable[[FusedFrame, dict[str, Any]], Awaitable[None]]
_MAX_SOURCES = 10_000
_MS = 1_000_000


@dataclass
class GLMStats:
    #: Frames that passed the trigger (sent to the model, or would have been
    #: with ``backend = "none"``); ``calls`` counts backend calls (a batch is one).
    sent: int = 0
    calls: int = 0
    answered: int = 0
    errors: int = 0
    skipped: Counter[str] | None = None

    def __post_init__(self) -> None:
        self.skipped = Counter()


class GLMStage:
    """Builds prompts, decides whether to call, calls, and publishes via ``publish``."""

    def __init__(self, config: GLMConfig, publish: Publish, *, clock: Clock = time.monotonic_ns) -> None:
        self.config = config
        self.publish = publish
        self.template = PromptTemplate(config.template)
        self.client = AutoGLM.from_config(config) if config.backend != "none" else None
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s, clock)
        self.stats = GLMStats()
        self._histories: OrderedDict[str, History] = OrderedDict()
        self._queue: deque[tuple[FusedFrame, dict[str, Any]]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0
        self._workers: list[asyncio.Task[None]] = []
        #: Backend calls in flight: :meth:`drain` cancels those it cannot wait
        #: for, and their worker publishes the frames as ``skipped: shutdown``.
        self._calls: set[asyncio.Future[list[str]]] = set()
        self._closing = False
        batchable = self.client is not None and isinstance(self.client.backend, TransformersBackend)
        self._batch = config.batch_size if batchable else 1

    def adopt(self, old: GLMStage) -> None:
        """Carry a replaced stage's per-source history and counters (hot reload)."""
        self.stats = old.stats
        self._histories = old._histories

    # -- prompts -----------------------------------------------------------------------

    def history(self, source: str) -> History:
        h = self._histories.get(source)
        if h is None:
            h = self._histories[source] = History(self.config.history, self.config.history_chars)
            if len(self._histories) > _MAX_SOURCES:
                self._histories.popitem(last=False)
        self._histories.move_to_end(source)
        return h

    def answers(self, source: str) -> tuple[Answer, ...]:
        """``source``'s history as it stands (none kept: empty)."""
        h = self._histories.get(source)
        return h.answers() if h is not None else ()

    def restore(self, source: str, answers: tuple[Answer, ...]) -> None:
        """``source``'s history from elsewhere (another worker had it): it replaces
        what this stage may still hold of it from an earlier turn."""
        self._histories.pop(source, None)
        h = self.history(source)
        for a in answers:
            h.add(a.start_ns, a.end_ns, a.text)

    def prompt(self, frame: FusedFrame) -> str:
        values = prompt_values(frame, self.history(frame.source).render())
        return self.template.format(**{k: values[k] for k in self.template.variables})

    def _shown_prompt(self, frame: FusedFrame) -> str | None:
        """The prompt of a result that made no call: built only when asked for."""
        return self.prompt(frame) if self.config.include_prompt else None

    # -- intake ------------------------------------------------------------------------

    def start(self) -> None:
        if self.client is not None and not self._workers:
            loop = asyncio.get_running_loop()
            self._workers = [loop.create_task(self._work()) for _ in range(self.config.max_in_flight)]

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The running call workers (the engine supervises them)."""
        return list(self._workers)

    async def submit(self, frame: FusedFrame, record: dict[str, Any], skip: Verdict | None = None) -> None:
        """Take one frame; its result is published now or once the model answered.
        ``skip``: the trigger (the pipeline's) decided no call is due."""
        if skip is not None:
            await self._skip(frame, record, skip.why or "no_change", score=skip.score)
            return
        self.stats.sent += 1
        if self.client is None:
            record.update(prompt=self._shown_prompt(frame), answer=None, glm={"backend": "none"})
            await self.publish(frame, record)
            return
        if self._closing:  # drained (a reload retired this stage): no worker would take it
            await self._skip(frame, record, "shutdown")
            return
        if self.breaker.state == "open":
            await self._skip(frame, record, "breaker_open")
            return
        if len(self._queue) >= self.config.max_queue:
            if self.config.overload == "drop_newest":
                await self._skip(frame, record, "glm_overloaded")
                return
            old_frame, old_record = self._queue.popleft()
            await self._skip(old_frame, old_record, "glm_overloaded")
        self._queue.append((frame, record))
        self._idle.clear()
        self._wake.set()

    async def _skip(self, frame: FusedFrame, record: dict[str, Any], why: str, **extra: Any) -> None:
        assert self.stats.skipped is not None
        self.stats.skipped[why] += 1
        record.update(
            prompt=self._shown_prompt(frame),
            answer=None,
            glm={"backend": self.config.backend, "skipped": why, **extra},
        )
        await self.publish(frame, record)

    # -- calls -------------------------------------------------------------------------

    async def _work(self) -> None:
        assert self.client is not None
        while True:
            while not self._queue and not self._closing:
                if not self._busy:
                    self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            if self._closing:  # drain publishes what is still queued
                return
            batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
            self._busy += 1
            try:
                await self._call(batch)
            finally:
                self._busy -= 1
                self._wake.set()

    async def _call(self, batch: list[tuple[FusedFrame, dict[str, Any]]]) -> None:
        assert self.client is not None
        if not self.breaker.allow():
            for frame, record in batch:
                await self._skip(frame, record, "breaker_open")
            return
        prompts = [self.prompt(f) for f, _ in batch]
        images = [self._key_frame(f) for f, _ in batch]
        self.stats.calls += 1
        t0 = time.perf_counter_ns()
        answers: list[str] | None = None
        error = None
        call = asyncio.ensure_future(
            asyncio.wait_for(self.client.agenerate_batch(prompts, images), self.config.call_timeout_s)
        )
        self._calls.add(call)
        try:
            answers = await call
        except TimeoutError:
            error = f"GLM call timed out after {self.config.call_timeout_s} s"
        except GLMError as exc:
            error = str(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not call.cancelled() or (task is not None and task.cancelling()):
                raise  # this worker itself is being cancelled
            for frame, record in batch:  # drain gave up on the call: its frames are still published
                await self._skip(frame, record, "shutdown")
            return
        finally:
            self._calls.discard(call)
        took = round((time.perf_counter_ns() - t0) / _MS, 3)
        if error is None:
            self.breaker.success()
        else:
            self.breaker.failure()
            self.stats.errors += 1
            log.warning(
                "GLM call failed (%s): %s",
                self.breaker.state,
                error,
                extra={"source": batch[0][0].source, "trace_id": trace_id_of(batch[0][0])},
            )
        for i, (frame, record) in enumerate(batch):
            glm: dict[str, Any] = {
                "backend": self.config.backend,
                "model": self.config.model,
                "latency_ms": took,
            }
            answer = answers[i] if answers is not None else None
            if answer is not None:
                self.stats.answered += 1
                self.history(frame.source).add(frame.start_ns, frame.end_ns, answer)
            else:
                glm["error"] = error
            record.update(prompt=prompts[i], answer=answer, glm=glm)
            await self.publish(frame, record)

    def _key_frame(self, frame: FusedFrame) -> bytes | None:
        if not self.config.attach_images:
            return None
        img = frame.modalities.get("image")
        return img.attachment if img is not None else None

    async def drain(self, timeout: float) -> None:
        """Finish queued and in-flight calls up to ``timeout``; the rest are
        published as ``skipped: shutdown`` (never dropped), each frame once.

        After ``timeout`` the workers take nothing new, the calls still in
        flight are cancelled (a call that has answered by then is published
        with its answer), and each worker publishes its own frames before it
        stops, so no publish is cut off half way."""
        if self.client is None:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning(
                "GLM drain: %d calls in flight and %d frames queued after %.1f s: "
                "published as skipped: shutdown",
                len(self._calls),
                len(self._queue),
                timeout,
            )
        self._closing = True
        for call in self._calls:
            call.cancel()
        self._wake.set()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        while self._queue:
            frame, record = self._queue.popleft()
            await self._skip(frame, record, "shutdown")
        await self.client.aclose()

    @property
    def queued(self) -> int:
        return len(self._queue)
