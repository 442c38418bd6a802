"""What a start learns from the last run: inputs already stored, and inputs that crash the process.

:class:`ReadBack`: after a crash, the results and DLQ records stored since
the oldest unfinished input are read back, so that an input whose record
was stored but whose ack was lost is acked, not fused a second time.

:class:`CrashGuard`: an input that takes the whole process down (a decoder's
segfault, the OOM killer) escapes every ``try``, and since the consumer is
rebuilt at each start, ``max_deliver`` too. The guard notes in a KV bucket
how each run ended and which input was in hand while careful, and hands the
culprit over as ``poison``.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from engine.contracts.messages import Key
from engine.contracts.subjects import Subjects
from engine.transport.streams import Slot, raise_replicas, state_bucket, stream_names
from engine.transport.streams import oldest as oldest_of

if TYPE_CHECKING:
    from engine.config.models import NatsConfig

log = logging.getLogger("autoglm.durable")


class ReadBack:
    """The inputs (by key, and DLQ records by input sequence) already stored."""

    def __init__(self, js: Any, config: NatsConfig) -> None:
        self.js = js
        self.subjects = Subjects(config.subject_prefix)
        self.in_stream, self.out_stream = stream_names(config)
        self.stored_keys: set[Key] = set()
        self.stored_seqs: set[int] = set()

    async def read_back(self, since: datetime) -> None:
        """Read the results and DLQ records stored since ``since``: their inputs
        are done, whatever became of their acks."""
        sub = await self.js.pull_subscribe(
            self.subjects.everything,
            stream=self.out_stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=since - timedelta(seconds=1),
                inactive_threshold=30.0,
            ),
        )
        try:
            while True:
                try:
                    batch = await sub.fetch(500, timeout=1.0)
                except (NatsTimeoutError, TimeoutError):
                    break
                for msg in batch:
                    self.remember(msg)
                if not batch or batch[-1].metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        log.warning(
            "recovery: %d events and %d rejected inputs were already stored since %s",
            len(self.stored_keys),
            len(self.stored_seqs),
            since.isoformat(),
        )

    def remember(self, msg: Any) -> None:
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        if msg_id.startswith(f"dlq:{self.in_stream}:"):
            with contextlib.suppress(ValueError):
                self.stored_seqs.add(int(msg_id.rsplit(":", 1)[1]))
            return
        try:
            record = orjson.loads(msg.data)
            source = record["source"]
            groups = [*(record.get("events") or {}).values(), *(record.get("skipped") or {}).values()]
            if record.get("event_id"):  # a DLQ record
                groups.append([record["event_id"]])
            self.stored_keys.update((source, eid) for group in groups for eid in group)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            log.warning("recovery: unreadable record on %s", msg.subject)


class CrashGuard:
    """Catch an input that takes the whole process down (see the module docstring)."""

    def __init__(self, js: Any, config: NatsConfig, slot: Slot, replicas: int = 1) -> None:
        self.js = js
        self.config = config
        self.slot = slot
        self.replicas = replicas
        self.in_stream = stream_names(config)[0]
        #: Handle inputs up to this sequence one by one, each noted while in hand.
        self.careful_until = 0
        #: Inputs that took the process down while in hand: poison first.
        self.culprits: list[int] = []
        self._kv: Any = None

    @property
    def _inflight_key(self) -> str:
        return f"{self.slot.consumer}.inflight"

    @property
    def _run_key(self) -> str:
        return f"{self.slot.consumer}.run"

    async def in_hand(self, seq: int | None) -> None:
        """Note the input now in hand (``None``: it went through)."""
        await self._note(self._inflight_key, None if seq is None else str(seq).encode())

    async def setup(self) -> None:
        """Catch an input that takes the whole process down.

        A decoder's segfault or the OOM killer escapes every ``try``, and since
        the consumer is rebuilt at each start, ``max_deliver`` too: restarted
        by its supervisor, the engine would meet the same input forever, and
        nothing behind it would ever be processed. So each start notes in the
        state bucket whether the last run ended cleanly and what the oldest
        unfinished input was. After ``max_deliver - 1`` crashes in a row with
        the same oldest input, the backlog is handled one input at a time,
        each noted while in hand (through its processors): the start after the
        next crash finds the culprit there, records it as ``poison`` and
        removes it from the queue.
        """
        name = state_bucket(self.config)
        try:
            self._kv = await self.js.key_value(name)
        except BucketNotFoundError:
            self._kv = await self.js.create_key_value(
                KeyValueConfig(bucket=name, history=1, storage=StorageType.FILE, replicas=self.replicas)
            )
        else:
            if self.replicas > 1:
                await raise_replicas(self.js, f"KV_{name}", self.replicas)
        last = await self._read(self._run_key)
        culprit = await self._read(self._inflight_key)
        if culprit is not None:
            log.error("input %s took the engine down while in hand: recording it as poison", culprit)
            self.culprits.append(int(culprit))
            await self._note(self._inflight_key, None)
        first = await oldest_of(self.js, self.in_stream, self.slot.filter)
        oldest = first.seq if first is not None else None
        crashes = 0
        if isinstance(last, dict) and not last.get("clean") and oldest is not None and culprit is None:
            crashes = int(last.get("crashes", 0)) + 1 if last.get("oldest") == oldest else 1
        if crashes >= self.config.max_deliver - 1:
            self.careful_until = (await self.js.stream_info(self.in_stream)).state.last_seq
            log.warning(
                "%d crashes in a row with input %d unfinished: handling inputs up to %d one at a time "
                "to find the one that takes the engine down",
                crashes,
                oldest,
                self.careful_until,
            )
        await self._note(self._run_key, orjson.dumps({"clean": False, "crashes": crashes, "oldest": oldest}))

    async def _read(self, key: str) -> Any:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        return orjson.loads(entry.value) if entry.value else None

    async def _note(self, key: str, value: bytes | None) -> None:
        """Write (``None``: delete) a state entry; trouble here must not stop intake."""
        try:
            if value is None:
                await self._kv.delete(key)
            else:
                await self._kv.put(key, value)
        except Exception as exc:  # the server is away: the guard is best effort
            log.warning("state bucket: %s", exc)

    async def close(self, clean: bool) -> None:
        """Note how this run ended (a failed one counts as a crash)."""
        if self._kv is not None and clean:
            await self._note(self._run_key, orjson.dumps({"clean": True, "crashes": 0, "oldest": None}))
