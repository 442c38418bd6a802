"""The JetStream streams the transport works on, and what a start finds in them.

``<STREAM>_IN`` is a work queue of the *unprocessed* inputs (an input leaves
it when acked, and it is acked only once its record is stored), so its limits
bound the backlog, never the history; full, it refuses new events (discard
``new``). ``<STREAM>_OUT`` holds results and DLQ records, deduplicated on
their ids. ``<STREAM>_REC`` mirrors the inputs for ``autoglm replay``, with
its own limits, dropping its oldest when full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig, StreamSource
from nats.js.errors import NotFoundError

from engine.contracts.errors import TransportError
from engine.contracts.subjects import Subjects

if TYPE_CHECKING:
    from engine.config.models import NatsConfig

log = logging.getLogger("autoglm.durable")


def stream_names(config: NatsConfig) -> tuple[str, str]:
    """The input and result streams: ``<STREAM>_IN`` and ``<STREAM>_OUT``."""
    base = config.stream or config.subject_prefix.replace(".", "_").upper()
    return f"{base}_IN", f"{base}_OUT"


def record_stream(config: NatsConfig) -> str:
    """The replay history: ``<STREAM>_REC``, a mirror of the input stream."""
    return stream_names(config)[0][: -len("_IN")] + "_REC"


def state_bucket(config: NatsConfig) -> str:
    """The KV bucket where an engine notes how its last run ended: ``<STREAM>_STATE``."""
    return stream_names(config)[0][: -len("_IN")] + "_STATE"


def dlq_msg_id(stream: str, seq: int) -> str:
    """``Nats-Msg-Id`` of the DLQ record of input ``seq``: a second record of the
    same input (a redelivery after a lost ack) is dropped by the results stream."""
    return f"dlq:{stream}:{seq}"


def stream_configs(config: NatsConfig) -> list[StreamConfig]:
    """The input, output and (unless ``record_max_bytes = 0``) recording streams."""
    subjects = Subjects(config.subject_prefix)
    in_stream, out_stream = stream_names(config)
    streams = [
        StreamConfig(
            name=in_stream,
            subjects=[subjects.inputs],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=config.stream_max_age_s,
            max_bytes=config.stream_max_bytes,
            duplicate_window=config.duplicate_window_s,
            # Full: refuse new events (the producer's PubAck says so); what
            # fills it is unprocessed, so dropping the oldest would lose data.
            discard=DiscardPolicy.NEW,
        ),
        StreamConfig(
            name=out_stream,
            subjects=list(subjects.outputs),
            storage=StorageType.FILE,
            max_age=config.stream_max_age_s,
            max_bytes=config.stream_max_bytes,
            duplicate_window=config.duplicate_window_s,
        ),
    ]
    if config.record_max_bytes > 0:
        streams.append(
            StreamConfig(
                name=record_stream(config),
                mirror=StreamSource(name=in_stream),
                storage=StorageType.FILE,
                max_age=config.record_max_age_s,
                max_bytes=config.record_max_bytes,
                discard=DiscardPolicy.OLD,
            )
        )
    return streams


async def ensure(js: Any, stream: StreamConfig) -> None:
    try:
        info = await js.stream_info(stream.name)
    except NotFoundError:
        await js.add_stream(stream)
        return
    have = info.config.retention
    if stream.retention is not None and have != stream.retention:
        raise TransportError(
            # nats-py reads it back as a plain string, not the enum
            f"stream {stream.name} has retention {getattr(have, 'value', have) or '?'} but the engine "
            f"needs {stream.retention.value}; it was made by an older version: "
            f"delete it (nats stream rm {stream.name}) or set nats.stream to a new name"
        )
    if stream.mirror is None:  # a mirror's configuration cannot be updated
        await js.update_stream(stream)


async def mirror_attached(js: Any, rec_stream: str, in_stream: str, timeout: float = 5.0) -> None:
    """Wait until the recording mirror follows the input stream: events acked
    before it attaches would leave the work queue unrecorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await js.stream_info(rec_stream)
        if info.mirror is not None and info.mirror.active is not None and info.mirror.active >= 0:
            return
        await asyncio.sleep(0.05)
    log.warning("the recording stream %s has not attached to %s yet", rec_stream, in_stream)


async def replay_point(js: Any, in_stream: str, consumer: str) -> tuple[datetime | None, int | None]:
    """At start: what is left in the work queue is unfinished. Returns its
    oldest event's stream time (results stored since then are read back),
    or ``None`` when the queue is empty, and the sequence the rebuilt
    consumer replays from (``None``: the consumer was kept).

    The decision rests on the stream, not on the consumer: a crash while
    the consumer was being rebuilt, or during the read-back, leaves a
    fresh consumer that knows nothing of what was delivered before.

    The consumer is rebuilt to deliver the whole queue in stream order
    when it holds unacked events (otherwise they would come back only
    when their AckWait ran out, after newer events had moved the
    watermark, and be refused as too late) or when the queue holds
    events the consumer no longer delivers (it gave up on them at
    max_deliver while the engine could not hear them).
    """
    for _ in range(10):
        state = (await js.stream_info(in_stream)).state
        if not state.messages:
            return None, None
        try:
            info = await js.consumer_info(in_stream, consumer)
        except NotFoundError:
            info = None
        try:
            oldest = await js.get_msg(in_stream, seq=state.first_seq, next=True)
            break
        except NotFoundError:
            # Acked in the meantime: a killed engine's last acks can still be on
            # their way to the server when its successor starts. Read again.
            await asyncio.sleep(0.05)
    else:
        raise TransportError(f"{in_stream}: its oldest message kept disappearing while the engine started")
    if info is not None and (
        info.num_ack_pending or state.messages > info.num_pending + info.num_ack_pending
    ):
        log.warning(
            "%d events unfinished at the last stop (%d unacked): replaying %s from sequence %d",
            state.messages,
            info.num_ack_pending,
            in_stream,
            oldest.seq,
        )
        await js.delete_consumer(in_stream, consumer)
        return oldest.time, oldest.seq
    when: datetime | None = oldest.time
    return when, None
