"""Producer side: what ``autoglm publish`` does, usable from Python too."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import soundfile
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError

from engine.contracts.errors import AutoGLMError, TransportError
from engine.contracts.subjects import Subjects
from engine.contracts.types import Modality
from engine.observe.tracing import new_traceparent
from engine.transport.sync import connect as connect  # tools and tests import these two here
from engine.transport.sync import sync_with_server as sync_with_server
from engine.wire.claimcheck import OBJECT_REF, put_payload
from engine.wire.codec import ID_HEADER, encode_headers


def sniff_image(data: bytes, path: Path) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:2] == b"\xff\xd8":
        return "image/jpeg"
    raise AutoGLMError(f"{path}: not a JPEG or PNG file")


def audio_chunks(path: Path, chunk_ms: int) -> tuple[list[bytes], str, int]:
    """Split an audio file into f32le PCM chunks: (bodies, content type, chunk ns)."""
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise AutoGLMError(f"{path}: cannot read audio: {exc}") from exc
    step = max(1, int(rate * chunk_ms / 1000))
    bodies = [
        np.ascontiguousarray(data[i : i + step], dtype="<f4").tobytes() for i in range(0, len(data), step)
    ]
    ct = f"audio/pcm;rate={rate};channels={data.shape[1]};format=f32le"
    return bodies, ct, int(step * 1e9 / rate)


async def send_events(nc: Any, subject: str, events: list[tuple[dict[str, str], bytes]]) -> list[str]:
    """Publish ``events``; returns the ids the input stream refused as duplicates.

    Where JetStream stores the inputs each event waits for its PubAck, so a
    refusal (a full backlog) is an error and a ``duplicate`` is reported: the
    stream deduplicates ``Nats-Msg-Id`` across *all* sources. Where nothing
    answers (core mode), the events are sent plainly."""
    js = nc.jetstream()
    duplicates: list[str] = []
    acked = True
    for hdrs, body in events:
        if not acked:
            await nc.publish(subject, body, headers=hdrs)
            continue
        try:
            ack = await js.publish(subject, body, headers=hdrs, timeout=2.0)
        except (NoRespondersError, NatsTimeoutError):
            acked = False  # no stream: an engine in core mode got it (or no one listens)
            continue
        except APIError as exc:
            raise TransportError(f"the input stream refused {hdrs.get(ID_HEADER)}: {exc}") from exc
        if ack.duplicate:
            duplicates.append(hdrs.get(ID_HEADER, "?"))
    await nc.flush()
    return duplicates


async def publish_file(
    url: str,
    source: str,
    *,
    image: Path | None = None,
    audio: Path | None = None,
    text: str | None = None,
    prefix: str = "autoglm",
    chunk_ms: int = 100,
    event_id: str | None = None,
    wait: float = 0.0,
    traceparent: str | None = None,
    connect_opts: dict[str, Any] | None = None,
    claim_check: bool = False,
    bucket: str = "autoglm-payloads",
) -> int:
    """Publish one image, text, or an audio file as chunks; print what comes back.

    Every event carries ``traceparent`` (a new trace when none is given), so
    the engine's spans and the result continue the producer's trace."""
    subjects = Subjects(prefix)
    bodies: list[bytes]
    modality: Modality
    if image is not None:
        data = await asyncio.to_thread(image.read_bytes)
        bodies, ct, modality, step = [data], sniff_image(data, image), "image", 0
    elif audio is not None:
        bodies, ct, step = await asyncio.to_thread(audio_chunks, audio, chunk_ms)
        modality = "audio"
    elif text is not None:
        bodies, ct, modality, step = [text.encode("utf-8")], "text/plain;charset=utf-8", "text", 0
    else:
        raise AutoGLMError("nothing to publish: give --image, --audio or --text")
    refusals: list[str] = []

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            refusals.append(str(exc))

    nc = await connect(url, error_cb=on_error, **(connect_opts or {}))
    try:
        cts = [ct] * len(bodies)
        for i, body in enumerate(bodies):
            # Over the server's limit (or asked to): the bytes go to the Object
            # Store and the event carries a reference (engine/wire/claimcheck.py).
            if claim_check or len(body) > nc.max_payload - 4096:
                ref = await put_payload(nc.jetstream(), bucket, body, ct, max_payload=nc.max_payload)
                bodies[i], cts[i] = ref.encode(), OBJECT_REF
                print(f"stored {len(body)} bytes as {bucket}/{ref.name} (claim check)")
        replies: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

        async def on_reply(msg: Any) -> None:
            tp = (msg.headers or {}).get("traceparent", "-")
            await replies.put((f"{msg.subject} traceparent={tp}", orjson.loads(msg.data)))

        if wait > 0:
            await nc.subscribe(subjects.result(source), cb=on_reply)
            await nc.subscribe(subjects.dlq(source), cb=on_reply)
            await sync_with_server(nc)
            if refusals:  # e.g. the --secure producer user: it may not read results
                print(f"--wait: this user may not read results ({refusals[0]}); publishing without waiting")
                wait = 0.0
        subject = subjects.input(source, modality)
        t0 = time.time_ns()
        base_id = event_id or f"{source}-{modality}-{t0}"
        ids = [base_id if len(bodies) == 1 else f"{base_id}-{i}" for i in range(len(bodies))]
        traceparent = traceparent or new_traceparent()
        events = [
            (encode_headers(t0 + i * step, cts[i], event_id=eid, seq=i, traceparent=traceparent), body)
            for i, (eid, body) in enumerate(zip(ids, bodies, strict=True))
        ]
        duplicates = await send_events(nc, subject, events)
        print(f"published {len(bodies)} {modality} event(s) on {subject} ({ct}), trace {traceparent}")
        if duplicates:
            raise AutoGLMError(
                f"the input stream already held event id(s) {', '.join(duplicates[:5])}: it dropped these "
                "events as duplicates. Ids must be unique across every source (the default ids are)"
            )
        deadline = time.monotonic() + wait
        waiting = set(ids)
        while wait > 0 and waiting and (left := deadline - time.monotonic()) > 0:
            try:
                subj, record = await asyncio.wait_for(replies.get(), left)
            except TimeoutError:
                break
            waiting.discard(record.get("event_id"))
            waiting.difference_update(eid for group in record.get("events", {}).values() for eid in group)
            print(subj, orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())
        if wait > 0 and waiting:
            print(f"no result yet for {len(waiting)} event(s) after {wait:g} s (windows may still be open)")
        return len(bodies)
    finally:
        await nc.close()
