"""The results consumer: typed records of chosen sources, as they arrive.

    async with Results(url, sources=["cam0"], dlq=True) as results:
        async for record in results:   # a Result, or (dlq=True) a Rejection
            print(record.source, record.answer if isinstance(record, Result) else record.reason)

Two ways to read:

- **live** (the default): plain subscriptions on ``<prefix>.out.<source>``
  (and ``.dlq.``/``.late.`` with ``dlq=True``), from now on; what is
  published while nobody listens is not seen. Works in core and durable mode.
- **from the results stream** (durable mode): ``durable="name"`` reads
  through a named JetStream consumer that the server keeps, so a consumer
  that stops and starts again resumes where it left off; ``from_start`` or
  ``since`` choose where a *new* consumer starts (an existing one resumes).
  Either without a name reads the stream once through an ephemeral consumer.

A record read from the stream is acknowledged when the next one is asked
for, or when the ``async with`` block ends: a consumer that crashes while
handling one sees it again after its restart (at least once), one that
stops cleanly sees none twice. Parts of one window share ``source`` and
``window.start_ns`` (docs/wire.md, "Results").
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, Self

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from engine.config.nats import NatsConfig
from engine.contracts.errors import AutoGLMError, TransportError
from engine.contracts.records import Rejection, Result
from engine.contracts.subjects import Subjects
from engine.transport.streams import stream_names
from engine.transport.sync import connect, sync_with_server

Record = Result | Rejection


class Results:
    """Results (and with ``dlq=True`` rejections) of ``sources`` (default: all)."""

    def __init__(
        self,
        url: str = "",
        *,
        sources: list[str] | None = None,
        prefix: str = "autoglm",
        dlq: bool = False,
        durable: str | None = None,
        from_start: bool = False,
        since: datetime | None = None,
        nc: Any = None,
        connect_opts: dict[str, Any] | None = None,
        batch: int = 64,
        stream: str | None = None,
    ) -> None:
        if nc is None and not url:
            raise AutoGLMError("Results needs a NATS url (or a connected client as nc=)")
        subjects = Subjects(prefix)
        self.prefix = prefix
        if sources:
            self.subjects = [subjects.result(s) for s in sources]
            if dlq:
                self.subjects += [subjects.dlq(s) for s in sources] + [subjects.late(s) for s in sources]
        else:
            self.subjects = [subjects.results, *((subjects.rejections, subjects.lates) if dlq else ())]
        self.durable, self.from_start, self.since, self.batch = durable, from_start, since, batch
        self.stream = durable is not None or from_start or since is not None
        self.stream_name = stream
        #: Messages on these subjects that were not a record (someone else's, or malformed).
        self.invalid = 0
        self._url, self._opts, self._nc, self._own = url, connect_opts or {}, nc, nc is None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pull: Any = None
        self._subs: list[Any] = []
        self._unacked: Any = None
        self._ready = False

    async def __aenter__(self) -> Self:
        await self._start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # Leaving on an exception (the handler raised, a closed pipe while
        # printing it): the last record handed out was not handled.
        await self.close(handled=exc_type is None)

    async def close(self, *, handled: bool = True) -> None:
        """Acknowledge the last record handed out if it was ``handled`` (else
        hand it back too), hand back those fetched but not handed out
        (redelivered at once to the next reader, not after the ack wait), and
        let go."""
        try:
            if self._unacked is not None:
                last, self._unacked = self._unacked, None
                await (last.ack_sync() if handled else last.nak())
            if self._pull is not None:
                while not self._queue.empty():
                    await self._queue.get_nowait().nak()
        finally:
            if self._pull is not None and self.durable is None:
                await self._pull.unsubscribe()
            for sub in self._subs:  # a client passed in (nc=) stays open: take ours off it
                await sub.unsubscribe()
            self._subs.clear()
            if self._own and self._nc is not None:
                await self._nc.close()
                self._nc = None

    async def _start(self) -> None:
        if self._ready:
            return
        if self._nc is None:
            self._nc = await connect(self._url, **self._opts)
        if self.stream:
            await self._bind()
        else:
            for subject in self.subjects:
                self._subs.append(await self._nc.subscribe(subject, cb=self._queue.put))
            await sync_with_server(self._nc)
        self._ready = True

    async def _find_stream(self, js: Any) -> str:
        """The results stream: as given, else asked of the server, else by the
        engine's naming (``<PREFIX>_OUT``) for a user that may not ask
        (``--secure``'s reader may only look at the results stream itself)."""
        if self.stream_name is not None:
            return self.stream_name
        try:
            found: str = await js.find_stream_name_by_subject(self.subjects[0])
        except NotFoundError as exc:
            raise TransportError(
                f"no results stream holds {self.subjects[0]}: the engine runs in core mode "
                "(read live instead: no durable, from_start or since)"
            ) from exc
        except (NatsTimeoutError, NoRespondersError):  # not allowed to ask, or no JetStream
            return stream_names(NatsConfig(subject_prefix=self.prefix))[1]
        return found

    async def _bind(self) -> None:
        """The named consumer as it is, or a new one starting where asked."""
        js = self._nc.jetstream()
        stream = await self._find_stream(js)
        if self.durable is not None:
            try:
                info = await js.consumer_info(stream, self.durable)
            except NotFoundError:
                pass
            else:  # it exists: resume where it left off, if it reads what is asked for
                cfg = info.config
                reads = sorted(cfg.filter_subjects or ([cfg.filter_subject] if cfg.filter_subject else []))
                if reads != sorted(self.subjects):
                    raise AutoGLMError(
                        f"the durable consumer {self.durable!r} reads {', '.join(reads) or 'everything'}, "
                        f"not {', '.join(self.subjects)}: name another one for these sources, or delete "
                        f"it (nats consumer rm {stream} {self.durable}) to start it over"
                    )
                self._pull = await js.pull_subscribe_bind(durable=self.durable, stream=stream)
                return
        policy = DeliverPolicy.NEW
        if self.since is not None:
            policy = DeliverPolicy.BY_START_TIME
        elif self.from_start:
            policy = DeliverPolicy.ALL
        config = ConsumerConfig(
            name=self.durable,  # CONSUMER.CREATE.<stream>.<name>: the request --secure's reader may make
            durable_name=self.durable,
            filter_subjects=self.subjects,
            deliver_policy=policy,
            opt_start_time=self.since,
            ack_policy=AckPolicy.EXPLICIT,
            inactive_threshold=None if self.durable else 300.0,
        )
        info = await js.add_consumer(stream, config=config)
        self._pull = await js.pull_subscribe_bind(consumer=info.name, stream=stream)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Record:
        await self._start()
        while True:
            msg = await self._next_message()
            record = self._parse(msg)
            if record is not None:
                return record

    async def _next_message(self) -> Any:
        if self._pull is None:
            return await self._queue.get()
        if self._unacked is not None:  # asked for the next one: the last one was handled
            await self._unacked.ack()
            self._unacked = None
        while self._queue.empty():
            try:
                for msg in await self._pull.fetch(self.batch, timeout=5.0):
                    self._queue.put_nowait(msg)
            except TimeoutError:
                continue  # nothing new yet
        msg = self._queue.get_nowait()
        self._unacked = msg
        return msg

    def _parse(self, msg: Any) -> Record | None:
        is_result = msg.subject.startswith(f"{self.prefix}.out.")
        try:
            if is_result:
                return Result.model_validate_json(msg.data)
            return Rejection.model_validate_json(msg.data)
        except ValidationError:
            self.invalid += 1
            return None
