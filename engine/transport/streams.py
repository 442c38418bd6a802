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
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
    SubjectTransform,
)
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


def workers_bucket(config: NatsConfig) -> str:
    """The KV bucket of worker leases and partition owners: ``<STREAM>_WORKERS``."""
    return stream_names(config)[0][: -len("_IN")] + "_WORKERS"


def glm_bucket(config: NatsConfig) -> str:
    """The KV bucket of each source's GLM history and last frame sent: ``<STREAM>_GLM``."""
    return stream_names(config)[0][: -len("_IN")] + "_GLM"


@dataclass(frozen=True, slots=True)
class Slot:
    """A share of the input stream that one worker owns at a time: a partition
    (``"0"`` .. ``"N-1"``), or with ``N > 1`` the ``"rest"``: inputs whose
    subject the transform left alone (malformed ones, and any stored before
    partitioning), refused by whoever owns it."""

    name: str
    #: The durable pull consumer of this share.
    consumer: str
    filter: str


def slots(config: NatsConfig) -> list[Slot]:
    """The shares of the input stream that workers own (see :class:`Slot`)."""
    subjects = Subjects(config.subject_prefix)
    if config.partitions == 1:
        return [Slot("0", config.consumer, subjects.inputs)]
    return [
        *(Slot(str(p), f"{config.consumer}-p{p}", subjects.partition(p)) for p in range(config.partitions)),
        Slot("rest", config.consumer, subjects.inputs),
    ]


async def replicas_for(nc: Any, config: NatsConfig) -> int:
    """Replicas of what the engine makes: ``nats.replicas``, or (0) as many as
    the cluster has servers, at most 3; 1 on a lone server.

    JetStream tells an ordinary account nothing of its peers (``$JS.API.INFO``
    has no cluster in it; the meta group is the system account's), so the
    count is what the server's INFO advertises: ``connect_urls`` holds the
    client URL of every server of the cluster, its own included (nats-server
    2.x), the ones down at the moment not. A cluster that advertises nothing
    (``no_advertise``) cannot be counted: 1, and a warning to set it."""
    if config.replicas:
        return config.replicas
    info = getattr(nc, "_server_info", None) or {}
    if not info.get("cluster"):
        return 1
    servers = set(info.get("connect_urls") or [])
    if not servers:
        log.warning(
            "NATS cluster %s does not advertise its servers: streams get 1 replica; "
            "set nats.replicas (3 on a 3-node cluster)",
            info["cluster"],
        )
    return max(1, min(3, len(servers)))


async def raise_replicas(js: Any, stream: str, replicas: int) -> None:
    """Give the existing ``stream`` (a bucket's: ``KV_<name>``, ``OBJ_<name>``)
    at least ``replicas``. Never fewer: a start while a node is down counts
    one server less, and must not take a replica from what survives it
    (``nats stream edit NAME --replicas N`` lowers one on purpose)."""
    info = await js.stream_info(stream)
    if (info.config.num_replicas or 1) < replicas:
        log.warning("stream %s: %d replicas -> %d", stream, info.config.num_replicas or 1, replicas)
        info.config.num_replicas = replicas
        await js.update_stream(info.config)


def dlq_msg_id(stream: str, seq: int) -> str:
    """``Nats-Msg-Id`` of the DLQ record of input ``seq``: a second record of the
    same input (a redelivery after a lost ack) is dropped by the results stream."""
    return f"dlq:{stream}:{seq}"


def stream_configs(config: NatsConfig, replicas: int = 1) -> list[StreamConfig]:
    """The input, output and (unless ``record_max_bytes = 0``) recording streams."""
    subjects = Subjects(config.subject_prefix)
    in_stream, out_stream = stream_names(config)
    transform = None
    if config.partitions > 1:
        src, dest = subjects.partition_transform(config.partitions)
        transform = SubjectTransform(src=src, dest=dest)
    streams = [
        StreamConfig(
            name=in_stream,
            subjects=[subjects.inputs],
            subject_transform=transform,
            num_replicas=replicas,
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
            num_replicas=replicas,
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
                num_replicas=replicas,
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
    if stream.retention == RetentionPolicy.WORK_QUEUE:
        had = partitions_of(info.config.subject_transform)
        want = partitions_of(stream.subject_transform)
        if had != want and info.state.messages:
            raise TransportError(
                f"nats.partitions = {want}, but {stream.name} still holds {info.state.messages} "
                f"unprocessed events partitioned for {had}: run the engine with nats.partitions = {had} "
                "until the stream is empty, then change it"
            )
    if stream.mirror is None:  # a mirror's configuration cannot be updated
        # raised, never lowered: see raise_replicas
        stream.num_replicas = max(stream.num_replicas or 1, info.config.num_replicas or 1)
        await js.update_stream(stream)


def partitions_of(transform: Any) -> int:
    """N of a ``{{partition(N,1)}}`` transform; 1 for none."""
    dest = getattr(transform, "dest", None) or ""
    if "partition(" not in dest:
        return 1
    return int(dest.split("partition(", 1)[1].split(",", 1)[0])


async def oldest(js: Any, stream: str, subject: str) -> Any:
    """The oldest message of ``stream`` on ``subject`` (a wildcard), or ``None``.
    (``next`` finds the first at or after the sequence asked: one acked
    meanwhile, a killed engine's last ack arriving late, is skipped.)"""
    state = (await js.stream_info(stream)).state
    if not state.messages:
        return None
    try:
        return await js.get_msg(stream, seq=max(1, state.first_seq), next=True, subject=subject)
    except NotFoundError:
        return None


async def count(js: Any, stream: str, subject: str) -> int:
    """How many messages of ``stream`` are on ``subject`` (a wildcard)."""
    info = await js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


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


async def replay_point(js: Any, in_stream: str, slot: Slot) -> tuple[datetime | None, int | None]:
    """At start or takeover: what is left of ``slot`` in the work queue is
    unfinished. Returns its oldest event's stream time (results stored since
    then are read back), or ``None`` when there is none, and the sequence the
    rebuilt consumer replays from (``None``: the consumer was kept).

    The decision rests on the stream, not on the consumer: a crash while
    the consumer was being rebuilt, or during the read-back, leaves a
    fresh consumer that knows nothing of what was delivered before.

    The consumer is rebuilt to deliver the whole queue in stream order
    when it holds unacked events (otherwise they would come back only
    when their AckWait ran out, after newer events had moved the
    watermark, and be refused as too late; a worker that handed the
    partition over left its open windows' events unacked on purpose) or
    when the queue holds events the consumer no longer delivers (it gave
    up on them at max_deliver while the engine could not hear them).
    """
    first = await oldest(js, in_stream, slot.filter)
    if first is None:
        return None, None
    try:
        info = await js.consumer_info(in_stream, slot.consumer)
    except NotFoundError:
        info = None
    if info is not None:
        waiting = await count(js, in_stream, slot.filter)
        if info.num_ack_pending or waiting > info.num_pending + info.num_ack_pending:
            log.warning(
                "%d events of %s unfinished (%d unacked): replaying them from sequence %d",
                waiting,
                slot.filter,
                info.num_ack_pending,
                first.seq,
            )
            await js.delete_consumer(in_stream, slot.consumer)
            return first.time, first.seq
    when: datetime | None = first.time
    return when, None
