"""Every long-running task of the engine is watched: one that dies kills the engine.

An engine whose fetch loop died but whose health endpoint still answers
"ok" is the worst failure there is: nothing is processed, nothing is
reported, and the container supervisor sees no reason to restart it. So a
task that ends with an exception (or returns while the engine is not
stopping) marks the engine failed: it is logged once, ``health`` and
``$SRV.STATS`` say ``unhealthy`` with the task's name and error, and
``autoglm run`` exits non-zero (:data:`EXIT_FAILED`) without acking what it
holds, so that JetStream delivers it again to the restarted engine.

Conditions that are not a death but stop progress (a store retrying while
the server is away) are *degraded* reasons: reported, not fatal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("autoglm.supervisor")

#: ``autoglm run`` exit status when a supervised task died (EX_SOFTWARE).
EXIT_FAILED = 70


class Supervisor:
    """Watches tasks; keeps the first failure and the current degraded reasons."""

    def __init__(self) -> None:
        self.failed = asyncio.Event()
        #: ``"<task>: <ExceptionType>: <message>"`` of the first task that died.
        self.failure: str | None = None
        self.stopping = False
        #: reason -> monotonic second since when it holds.
        #: reason -> (monotonic second it began, how many hold it now): two
        #: stores retrying at once are one reason that ends when both have.
        self._degraded: dict[str, tuple[float, int]] = {}
        #: Monotonic second the last degraded reason cleared (a loop held up until
        #: then is not hung).
        self.calm_since = time.monotonic()
        self._tasks: dict[asyncio.Task[Any], str] = {}

    def spawn(self, name: str, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Start ``work`` as a watched task."""
        task = asyncio.get_running_loop().create_task(work, name=f"autoglm:{name}")
        self.watch(name, task)
        return task

    def watch(self, name: str, task: asyncio.Task[Any] | None) -> None:
        """Watch a task some component started."""
        if task is None:
            return
        self._tasks[task] = name
        task.add_done_callback(self._ended)

    def release(self, task: asyncio.Task[Any] | None) -> None:
        """A component is about to end ``task`` on purpose (a route retired by a reload)."""
        if task is not None:
            self._tasks.pop(task, None)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        name = self._tasks.pop(task, None)
        if name is None:
            return  # released: its owner ended it
        if task.cancelled():
            if not self.stopping:
                self.fail(name, "cancelled while the engine was running")
            return
        exc = task.exception()
        if exc is not None:
            log.error("task %s died", name, exc_info=exc)
            self.fail(name, f"{type(exc).__name__}: {exc}")
        elif not self.stopping:
            self.fail(name, "returned while the engine was running")

    def fail(self, name: str, why: str) -> None:
        if self.failure is None:
            self.failure = f"{name}: {why}"
            log.critical("engine unhealthy: %s; exiting so that a supervisor restarts it", self.failure)
        self.failed.set()

    def degrade(self, reason: str) -> None:
        since, holders = self._degraded.get(reason, (time.monotonic(), 0))
        self._degraded[reason] = (since, holders + 1)

    def recover(self, reason: str) -> None:
        """One holder of ``reason`` is done; the reason clears with its last."""
        entry = self._degraded.get(reason)
        if entry is None:
            return
        since, holders = entry
        if holders > 1:
            self._degraded[reason] = (since, holders - 1)
            return
        del self._degraded[reason]
        self.calm_since = time.monotonic()

    @property
    def degraded(self) -> bool:
        return bool(self._degraded)

    def check_progress(self, name: str, last: float, limit: float) -> None:
        """A loop that made no progress for ``limit`` seconds, while nothing
        explains it (no degraded reason), is hung: as bad as dead."""
        quiet = time.monotonic() - max(last, self.calm_since)
        if not self._degraded and quiet > limit:
            self.fail(name, f"no progress for {quiet:.0f} s")

    @property
    def status(self) -> str:
        if self.failure is not None:
            return "unhealthy"
        return "degraded" if self._degraded else "ok"

    def report(self) -> dict[str, Any]:
        """What ``health`` and ``$SRV.STATS`` show."""
        now = time.monotonic()
        out: dict[str, Any] = {"status": self.status}
        if self.failure is not None:
            out["failure"] = self.failure
        if self._degraded:
            out["degraded"] = {r: round(now - since, 1) for r, (since, _) in self._degraded.items()}
        return out
