"""Who owns which partition: leases in a NATS KV bucket, compare-and-set, TTL.

Every worker of one configuration (the same streams) shares the bucket
``<STREAM>_WORKERS``, whose entries expire ``nats.lease_s`` after their last
write:

- ``w.<worker>``: the worker is alive (rewritten every third of the lease);
- ``p.<slot>``: the worker named in it owns that slot. Taken with ``create``
  (fails while anyone holds it), renewed with ``update`` at the revision the
  owner last wrote (fails once anyone else wrote it), given up with
  ``delete`` at that revision.

Each slot's rightful owner comes from rendezvous hashing of ``(slot,
worker)``, capped so the spread is even (:func:`assignment`): every worker
computes the same answer from the same member list, and a join or a death
moves only a share of the slots. No home-made consensus: NATS orders the
writes and says who won; until the member lists agree, a slot stays with
whoever holds its lease.

A worker that has not renewed a lease for three quarters of ``lease_s``
(its server is unreachable, its loop starved) stops work on that slot before
the lease can expire and pass to another (:meth:`Ownership.tick`, ``lose``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from nats.errors import (
    ConnectionClosedError,
    ConnectionReconnectingError,
    NoRespondersError,
    StaleConnectionError,
)
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    ServiceUnavailableError,
)

from engine.contracts.errors import TransportError
from engine.transport.streams import Slot, raise_replicas, workers_bucket

if TYPE_CHECKING:
    from engine.config.models import NatsConfig

log = logging.getLogger("autoglm.partitions")

Action = Callable[[Slot], Awaitable[None]]
#: JetStream's "wrong last sequence" error codes (a compare-and-set that lost).
WRONG_LAST_SEQUENCE = (10071, 10164)

#: Seconds the server keeps a finished listing's consumer (see :func:`keys`).
WATCHER_IDLE_S = 2.0

#: What a NATS cluster answers while a node is down: a stream or consumer
#: electing a new leader (503, timeouts), the client moving to another node.
#: A takeover that meets one is released and tried again at the next turn.
TRANSIENT = (TimeoutError, NoRespondersError, ServiceUnavailableError, ConnectionClosedError,
             ConnectionReconnectingError, StaleConnectionError)  # fmt: skip


def worker_name() -> str:
    """``<host>-<pid>-<4 hex>``: unique, and says where the worker runs."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def assignment(slots: list[str], members: list[str]) -> dict[str, str]:
    """Slot -> the member that rightfully owns it: rendezvous hashing, capped so
    that every member gets ``len(slots) // len(members)`` or one more. Plain
    rendezvous hashing leaves a worker of two with nothing one time in sixteen
    over five slots; the cap keeps the spread even while a join or a death
    still moves only a share of the slots."""
    if not members:
        return {}
    base, extra = divmod(len(slots), len(members))
    ranked = sorted(
        ((hashlib.sha256(f"{slot}\x00{m}".encode()).digest(), slot, m) for slot in slots for m in members),
        reverse=True,
    )
    owner: dict[str, str] = {}
    load = dict.fromkeys(members, 0)
    for _, slot, m in ranked:
        if slot in owner:
            continue
        if load[m] < base or (load[m] == base and extra > 0):
            if load[m] == base:
                extra -= 1
            owner[slot] = m
            load[m] += 1
    return owner


async def keys(kv: Any, pattern: str) -> list[str]:
    """The live keys of ``kv`` matching ``pattern`` (filtered by the server).

    Each listing is a watcher, an ephemeral consumer that the server keeps
    until it has been unused for its ``inactive_threshold``: nats-py's 5
    minutes kept ~300 per worker at a 1 s turn, and the stream refused new
    ones at 1000 ("maximum consumers limit reached"). Not cancelled half
    made either (a consumer made with no one to stop it): bounded by the
    JetStream timeout, not ``wait_for``."""
    watcher = await kv.watch(pattern, ignore_deletes=True, meta_only=True, inactive_threshold=WATCHER_IDLE_S)
    found = []
    try:
        async for entry in watcher:
            if entry is None:  # the end of what is stored now
                break
            found.append(entry.key)
    finally:
        await watcher.stop()
    return found


class Ownership:
    """This worker's leases: takes what is rightfully its, gives what is not."""

    def __init__(
        self,
        js: Any,
        config: NatsConfig,
        slots: list[Slot],
        *,
        take: Action,
        give: Action,
        lose: Action,
        worker: str | None = None,
        replicas: int = 1,
    ) -> None:
        self.js = js
        self.config = config
        self.slots = {s.name: s for s in slots}
        self.worker = worker or worker_name()
        self.replicas = replicas
        self.lease_s = config.lease_s
        self._take, self._give, self._lose = take, give, lose
        self.kv: Any = None
        #: slot -> (revision of our lease, monotonic second it was last written).
        self.held: dict[str, tuple[int, float]] = {}
        #: Set (and replaced) after each renewal: confirmed() waits on it.
        self._turn = asyncio.Event()
        #: Slots being taken over, handed over or dropped right now.
        self._busy: dict[str, asyncio.Task[None]] = {}
        self.members: list[str] = []
        self.taken = 0
        self.given = 0
        self.lost = 0
        self._since = time.time()
        self._stop = asyncio.Event()
        #: Cleared when the engine stops: leases are still renewed while it
        #: finishes what it holds, but nothing is taken or given.
        self._active = True
        self.task: asyncio.Task[None] | None = None
        #: Awaited after each turn (the transport measures its partitions' lag).
        self.after: Callable[[], Awaitable[None]] | None = None

    @property
    def call_s(self) -> float:
        """The longest one KV write of the lease loop may take (nats-py waits
        5 s): a server that went away (a killed node, an election) must not
        hold the loop for several leases; one that answers later than a
        whole lease could not have kept it anyway."""
        return self.lease_s

    @property
    def owned(self) -> list[str]:
        return sorted(self.held, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))

    async def setup(self) -> None:
        name = workers_bucket(self.config)
        try:
            self.kv = await self.js.key_value(name)
        except BucketNotFoundError:
            self.kv = await self.js.create_key_value(
                KeyValueConfig(
                    bucket=name,
                    history=1,
                    ttl=self.lease_s,
                    storage=StorageType.FILE,
                    replicas=self.replicas,
                )
            )
        else:
            if self.replicas > 1:
                await raise_replicas(self.js, f"KV_{name}", self.replicas)
        ttl = (await self.kv.status()).ttl
        if not ttl:
            raise TransportError(
                f"the workers bucket {name} keeps its entries forever (no TTL), so a dead worker's "
                f"leases would never run out and its partitions never move: delete it (nats kv del "
                f"{name}; the engine makes it again with a TTL of nats.lease_s) or give it a TTL"
            )
        if abs(ttl - self.lease_s) > 1e-3:
            log.warning(
                "the workers bucket %s keeps leases %.1f s, not nats.lease_s = %.1f: using %.1f s "
                "(every worker of one configuration shares it)",
                name,
                ttl,
                self.lease_s,
                ttl,
            )
            self.lease_s = ttl

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="autoglm:partitions")
        self.task.add_done_callback(lambda _: self._renewed())  # see confirmed()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.lease_s / 3)
            if self._stop.is_set():
                return
            await self.tick()
            if self.after is not None:
                with contextlib.suppress(TimeoutError):  # a figure for status: never worth a lease
                    await asyncio.wait_for(self.after(), self.call_s)
            for slot, task in list(self._busy.items()):
                if task.done():
                    del self._busy[slot]
                    exc = None if task.cancelled() else task.exception()
                    if exc is not None and isinstance(exc, TRANSIENT):
                        # a NATS node died: the cluster elects, the client moves; next turn
                        log.warning("partition %s: takeover or handover failed (%r); trying again", slot, exc)
                        continue
                    task.result()  # a takeover or handover that failed otherwise is the loop's failure

    async def tick(self, *, wait: bool = False) -> None:
        """Say we are alive, renew our leases, then take and give toward the
        rightful owners; ``wait``: finish the takeovers before returning (start)."""
        await self._announce()
        await self._renew_all()
        if not self._active:
            return
        members = await self._members()
        if members is None or self.worker not in members:
            # A listing without this worker, which has just announced itself, is
            # wrong (nats-py's watcher now and then ends before the first entry):
            # acting on it would hand every partition over and take it back.
            return
        self.members = members
        owners = assignment(list(self.slots), members)
        for name, slot in self.slots.items():
            if name in self._busy:
                continue
            mine = owners.get(name) == self.worker
            if mine and name not in self.held:
                if await self._claim(name):
                    task = asyncio.get_running_loop().create_task(self._taking(slot))
                    self._busy[name] = task
                    if wait:
                        await task
            elif not mine and name in self.held:
                self._busy[name] = asyncio.get_running_loop().create_task(self._giving(slot))

    async def _announce(self) -> None:
        value = orjson.dumps({"since": self._since, "slots": self.owned, "pid": os.getpid()})
        try:
            await asyncio.wait_for(self.kv.put(f"w.{self.worker}", value), self.call_s)
        except Exception as exc:  # the server is away: the leases' own clocks decide
            log.warning("could not announce worker %s: %s", self.worker, exc)

    async def _members(self) -> list[str] | None:
        """The live workers; ``None`` when the list cannot be trusted this turn.

        nats-py's watch can end its listing before the entries come in (its
        end marker is decided on the consumer's pending count, which the
        server's answer may report before the delivery arrives): the list
        comes back short, or empty. We announced ourselves just before, so a
        list without us is such a list (or our entry ran out while the loop
        stalled), and giving partitions away on it would hand them to nobody."""
        members: list[str] = []
        for _ in range(3):  # the race is rare: asking again usually gives the whole list
            try:
                members = sorted(k[2:] for k in await keys(self.kv, "w.*"))
            except Exception as exc:
                log.warning("could not list workers: %s", exc)
                return None
            if self.worker in members:
                return members
        log.info("the list of workers came back without this one (%d listed); deciding nothing", len(members))
        return None

    async def _claim(self, name: str) -> bool:
        value = orjson.dumps({"worker": self.worker, "at": time.time()})
        try:
            sent = time.monotonic()  # the lease runs from when the server wrote it, after this
            rev = await asyncio.wait_for(self.kv.create(f"p.{name}", value), self.call_s)
        except Exception:  # held by another (its lease runs out, or it gives it up)
            return False
        self.held[name] = (rev, sent)
        return True

    def valid(self, name: str) -> bool:
        """This worker holds partition ``name``'s lease, last written less than
        three quarters of ``lease_s`` ago by the monotonic clock (which runs on
        while the process is stopped): nobody else can have it."""
        held = self.held.get(name)
        return held is not None and time.monotonic() - held[1] < self.lease_s * 0.75

    async def confirmed(self, name: str) -> bool:
        """:meth:`valid`, after the lease loop's next word on a lease gone stale.

        Asked before each fetch and each record stored. A worker whose loop
        stalled past its lease (SIGSTOP, a starved loop, a suspended VM, a
        NATS node that went away with the KV leader) wakes with windows to
        close and pulls to make before its lease loop runs: a pull would take
        events from the consumer the new owner rebuilt, a record could split a
        window the new owner is building. So they wait for the renewal: it
        succeeds only if nobody wrote the lease meanwhile (then nobody else
        had the partition), else the partition is lost."""
        while name in self.held and not self.valid(name):
            if self._stop.is_set() or (self.task is not None and self.task.done()):
                return False  # nothing renews it any more (leaving, or the loop died)
            await self._turn.wait()
        return self.valid(name)

    def _renewed(self) -> None:
        """Wake whoever waits in :meth:`confirmed`."""
        self._turn.set()
        self._turn = asyncio.Event()

    async def _renew_all(self) -> None:
        """Renew every lease at once (a server that went away costs one
        timeout, not one per partition), then drop the ones lost."""
        names = list(self.held)
        try:
            lost = await asyncio.gather(*(self._renew(name) for name in names))
        finally:
            self._renewed()
        for name, why in zip(names, lost, strict=True):
            if why is not None and name in self.held:
                self._drop(name, why)

    async def _renew(self, name: str) -> str | None:
        """Renew the lease of ``name``; returns why it is lost, if it is."""
        rev, last = self.held[name]
        value = orjson.dumps({"worker": self.worker, "at": time.time()})
        now = time.monotonic()  # when this write leaves: the lease runs from about then
        try:
            update = self.kv.update(f"p.{name}", value, last=rev)
            self.held[name] = (await asyncio.wait_for(update, self.call_s), now)
            return None
        except KeyWrongLastSequenceError:
            return "another worker holds its lease now, or it ran out"
        except Exception as exc:
            if time.monotonic() - last < self.lease_s * 0.75:
                log.warning("could not renew the lease of partition %s (%s); retrying", name, exc)
                return None
            return f"its lease could not be renewed for {time.monotonic() - last:.1f} s ({exc!r})"

    def _drop(self, name: str, why: str) -> None:
        """Drop the work of a lost slot in the background: dropping waits for
        the driver, whose records may wait in confirmed() for the renewal of
        other slots, which this loop must go on renewing."""
        log.error("partition %s lost: %s; dropping its work (the new owner replays it)", name, why)
        self.held.pop(name, None)
        self._renewed()  # what waits on it gives up now, before its work is dropped
        self.lost += 1
        self._busy[name] = asyncio.get_running_loop().create_task(
            self._losing(name, self._busy.pop(name, None))
        )

    async def _losing(self, name: str, busy: asyncio.Task[None] | None) -> None:
        if busy is not None:  # a takeover or handover under way ends here
            busy.cancel()
            with contextlib.suppress(BaseException):
                await busy
        self._busy[name] = asyncio.ensure_future(self._lose(self.slots[name]))

    async def _taking(self, slot: Slot) -> None:
        log.info("worker %s takes partition %s", self.worker, slot.name)
        try:
            await self._take(slot)
        except Exception:
            await self._release_lease(slot.name)
            raise
        self.taken += 1

    async def _giving(self, slot: Slot) -> None:
        log.info("worker %s hands partition %s over", self.worker, slot.name)
        await self._give(slot)
        await self._release_lease(slot.name)
        self.given += 1

    async def _release_lease(self, name: str) -> None:
        """Delete our lease so the next owner need not wait for it to expire. It
        may be another's by now (it ran out while we stalled): nats-py's
        ``delete`` then raises a plain ``APIError`` 10071, not
        ``KeyWrongLastSequenceError``. Any failure leaves the lease to its TTL:
        never a reason to stop the worker."""
        held = self.held.pop(name, None)
        if held is None:
            return
        try:
            await self.kv.delete(f"p.{name}", last=held[0])
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            pass
        except Exception as exc:  # expired, taken, or the server away: its TTL frees it
            if getattr(exc, "err_code", None) not in WRONG_LAST_SEQUENCE:
                log.warning("could not delete the lease of partition %s (%s); it expires", name, exc)

    async def stop(self) -> None:
        """Take and give nothing more; the leases are still renewed until :meth:`leave`."""
        self._active = False
        for task in list(self._busy.values()):
            with contextlib.suppress(BaseException):
                await task
        self._busy.clear()

    async def leave(self) -> None:
        """Give every lease up at once (the engine stopped): the others take over now,
        not when the leases run out."""
        self._stop.set()
        self._renewed()  # whatever waits in confirmed() gives up
        if self.task is not None and not self.task.done():
            with contextlib.suppress(BaseException):
                await self.task
        for name in list(self.held):
            with contextlib.suppress(Exception):
                await self._release_lease(name)
        with contextlib.suppress(Exception):
            await self.kv.delete(f"w.{self.worker}")
