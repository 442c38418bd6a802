"""A source's GLM state beyond this worker: read through on first sight, written behind.

Sources move between workers (a partition handed over, a worker dead). What
the GLM stage needs to go on with a source — its history, and for
``on_change`` the last frame sent (:mod:`engine.glm.state`) — lives in a
:class:`StateStore` any worker can read (the runtime's is a NATS KV bucket,
:mod:`engine.runtime.memorykv`). Nothing here does I/O of its own, and the
sans-I/O pipeline never sees the store: the driver tells :class:`Memory`
what happened.

- **Read-through.** The first event of a source this worker does not hold
  starts a read (:meth:`Memory.recall`); intake goes on. Before windows are
  closed (where the trigger decides), the driver awaits the reads under way
  (:meth:`Memory.settle`, at most ``timeout_s``): a source's first frame here
  is decided with the state its last worker left. A read that fails or runs
  out of time leaves the source starting afresh, counted.
- **Write-behind.** A frame sent or an answer recorded marks its source
  (:meth:`Memory.changed`, never awaited); a writer task stores the marked
  sources' state as it stands then, so a source marked many times is
  written once. At most ``max_pending`` sources wait; past it the
  **drop_oldest** policy drops the longest-waiting one, counted in
  ``dropped`` (its next change marks it again).
- **Fencing.** Every write is conditional on the revision this worker last
  read or wrote. A conflict means another worker wrote since: a worker that
  let the source go drops its write (the new owner's is newer); the holder
  writes over it.
- **Handover.** :meth:`Memory.leave` (before the pipeline forgets the sources)
  stops holding them and keeps their last snapshot, so their pending writes,
  and the answers of calls still in flight, are still stored;
  :meth:`Memory.written` waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from engine.glm.stage import GLMStage
from engine.glm.state import SourceState, decode, encode
from engine.glm.trigger import MAX_SOURCES, ChangeTrigger, Snapshot

log = logging.getLogger("autoglm.glm")

#: Sources written at once by one round of the writer (distinct keys, so order holds).
WRITE_BATCH = 64


class StateStore(Protocol):
    """Where sources' states are kept; errors are :class:`~engine.contracts.errors.TransportError`."""

    async def read(self, source: str) -> tuple[bytes, int] | None:
        """The stored value and its revision; ``None`` when nothing is stored."""

    async def write(self, source: str, value: bytes, revision: int) -> int | None:
        """Store ``value`` if the stored revision is still ``revision`` (0: none
        stored); the new revision, or ``None`` when another wrote since."""


@dataclass
class MemoryStats:
    #: Sources read (first sight here), and of those, found with a state.
    loads: int = 0
    found: int = 0
    #: Reads that failed, timed out or found a value this version cannot read.
    load_failures: int = 0
    writes: int = 0
    #: Pending writes dropped by the overload policy (``drop_oldest``).
    dropped: int = 0
    #: Writes that found another worker's revision.
    conflicts: int = 0
    write_failures: int = 0


@dataclass(slots=True)
class _Entry:
    #: The store's revision last read or written here (0: none stored).
    revision: int
    #: This worker has the source now (else: let go, its late writes fenced).
    held: bool = True
    #: Let go: the last frame sent, written beside a late answer.
    snapshot: Snapshot | None = None


class Memory:
    """Read-through and write-behind of each source's GLM state (module docstring)."""

    def __init__(
        self,
        store: StateStore,
        *,
        trigger: Callable[[], ChangeTrigger | None],
        stage: Callable[[], GLMStage],
        max_pending: int,
        timeout_s: float,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self.store = store
        #: The live trigger and stage (a hot reload replaces both).
        self.trigger, self.stage = trigger, stage
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.max_sources = max_sources
        self.stats = MemoryStats()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._dirty: OrderedDict[str, None] = OrderedDict()
        self._writing: set[str] = set()
        self._wake = asyncio.Event()
        self._done = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """Something is kept per source: the on_change trigger, or answers for a history."""
        stage = self.stage()
        return self.trigger() is not None or (stage.client is not None and stage.config.history > 0)

    @property
    def pending(self) -> int:
        return len(self._dirty) + len(self._writing)

    # -- read-through -------------------------------------------------------------------

    def knows(self, source: str) -> bool:
        """``source`` is held here, or being read."""
        entry = self._entries.get(source)
        if entry is not None and entry.held:
            self._entries.move_to_end(source)
            return True
        return source in self._loads

    def recall(self, source: str) -> None:
        """Start reading ``source``'s state (its first event here); never waits."""
        if source not in self._loads:
            self._loads[source] = asyncio.get_running_loop().create_task(self._load(source))

    @property
    def loading(self) -> bool:
        return bool(self._loads)

    async def settle(self) -> None:
        """Return once the reads under way are in, each given ``timeout_s``: a
        source whose read is not is taken as new. Reads that start meanwhile
        (events of new sources keep coming) are waited for too: one of their
        windows may close in the same poll."""
        while self._loads:
            waiting = dict(self._loads)
            await asyncio.wait(waiting.values(), timeout=self.timeout_s)
            for source, task in waiting.items():
                if self._loads.get(source) is not task:
                    continue  # in, or let go meanwhile
                task.cancel()
                self.stats.load_failures += 1
                log.warning("GLM state of %s not read in %.1f s: it starts afresh", source, self.timeout_s)
                self._install(source, 0, None)

    async def _load(self, source: str) -> None:
        self.stats.loads += 1
        revision, state = 0, None
        try:
            got = await self.store.read(source)
            if got is not None:
                data, revision = got
                state = decode(data)
        except Exception as exc:  # the store is away, or the value unreadable: start afresh
            self.stats.load_failures += 1
            log.warning("GLM state of %s not read (%s): it starts afresh", source, exc)
        self._install(source, revision, state)

    def _install(self, source: str, revision: int, state: SourceState | None) -> None:
        self._loads.pop(source, None)
        self._entries[source] = _Entry(revision)
        self._entries.move_to_end(source)
        if len(self._entries) > self.max_sources:
            self._entries.popitem(last=False)
        if state is None:
            return
        self.stats.found += 1
        trigger = self.trigger()
        if state.snapshot is not None and trigger is not None:
            trigger.restore(source, state.snapshot)
        self.stage().restore(source, state.history)

    # -- write-behind -------------------------------------------------------------------

    def changed(self, source: str) -> None:
        """``source``'s state changed (a frame sent, an answer recorded): write it behind."""
        if source not in self._entries or source in self._dirty:
            return  # not (or no longer) this worker's; or already waiting: written as it is then
        self._dirty[source] = None
        if len(self._dirty) > self.max_pending:
            self._dirty.popitem(last=False)
            self.stats.dropped += 1
        self._wake.set()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="autoglm:glm-memory")

    async def _run(self) -> None:
        while True:
            while not self._dirty:
                self._wake.clear()
                await self._wake.wait()
            batch: list[str] = []
            while self._dirty and len(batch) < WRITE_BATCH:
                batch.append(self._dirty.popitem(last=False)[0])
            self._writing = set(batch)
            try:
                await asyncio.gather(*(self._write(s) for s in batch))
            finally:
                self._writing = set()
                async with self._done:
                    self._done.notify_all()

    async def _write(self, source: str) -> None:
        entry = self._entries.get(source)
        if entry is None:
            return
        trigger = self.trigger()
        snap = entry.snapshot if not entry.held or trigger is None else trigger.snapshot_of(source)
        value = encode(SourceState(self.stage().answers(source), snap))
        try:
            revision = await self.store.write(source, value, entry.revision)
            if revision is None:
                self.stats.conflicts += 1
                if not entry.held:
                    return  # let go: the new owner's state is newer than ours
                got = await self.store.read(source)  # ours: write over what is there
                revision = await self.store.write(source, value, got[1] if got is not None else 0)
                if revision is None:
                    raise RuntimeError("written by another worker twice in a row")
        except Exception as exc:  # the store is away: the source's next change tries again
            self.stats.write_failures += 1
            log.warning("GLM state of %s not written: %s", source, exc)
            return
        entry.revision = revision
        self.stats.writes += 1

    # -- handover -----------------------------------------------------------------------

    def leave(self, owns: Callable[[str], bool]) -> list[str]:
        """Stop holding the sources ``owns`` picks (call before the trigger forgets
        them); returns those with writes still to store."""
        trigger = self.trigger()
        left = []
        for source, entry in self._entries.items():
            if entry.held and owns(source):
                entry.held = False
                entry.snapshot = trigger.snapshot_of(source) if trigger is not None else None
                left.append(source)
        for source, task in list(self._loads.items()):
            if owns(source):
                task.cancel()
                del self._loads[source]
        return [s for s in left if s in self._dirty or s in self._writing]

    async def written(self, sources: Iterable[str] | None = None) -> bool:
        """Wait (at most ``timeout_s``) until the writes of ``sources`` (``None``:
        all) are stored or given up; false when time ran out first."""
        wanted = None if sources is None else set(sources)

        def done() -> bool:
            if wanted is None:
                return not self._dirty and not self._writing
            return not any(s in self._dirty or s in self._writing for s in wanted)

        try:
            async with asyncio.timeout(self.timeout_s), self._done:
                await self._done.wait_for(done)
        except TimeoutError:
            log.warning("GLM state: %d writes not stored within %.1f s", self.pending, self.timeout_s)
            return False
        return True

    async def close(self) -> None:
        """Store what is pending (at most ``timeout_s``), then stop."""
        for task in self._loads.values():
            task.cancel()
        self._loads.clear()
        if self.task is not None:
            await self.written()
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
            self.task = None
