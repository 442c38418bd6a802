"""``autoglm publish --image/--text``: one event (or a WAV's chunks), optionally
waiting for its result; usable from Python too. Streams (``--video``,
``--audio``, ``--text-file``) are engine/tools/stream.py; both publish
through :class:`engine.sources.producer.Producer`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import soundfile

from engine.contracts.errors import AutoGLMError
from engine.contracts.subjects import Subjects
from engine.contracts.types import Modality
from engine.sources.producer import Producer
from engine.transport.sync import connect as connect  # tools and tests import these two here
from engine.transport.sync import sync_with_server as sync_with_server


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
        # The same path as every stream (engine/sources/producer.py): headers, claim check
        # above the server's limit (or asked for), PubAcks in durable mode.
        async with Producer(
            nc=nc,
            source=source,
            prefix=prefix,
            traceparent=traceparent,
            claim_check=claim_check,
            bucket=bucket,
        ) as producer:
            for i, (eid, body) in enumerate(zip(ids, bodies, strict=True)):
                await producer.send(modality, body, ct, t0 + i * step, event_id=eid)
        for size, name in producer.claims:
            print(f"stored {size} bytes as {bucket}/{name} (claim check)")
        print(
            f"published {len(bodies)} {modality} event(s) on {subject} ({ct}), trace {producer.traceparent}"
        )
        if producer.duplicates:
            raise AutoGLMError(
                f"the input stream already held event id(s) {', '.join(producer.duplicates[:5])}: it dropped "
                "these events as duplicates. Ids must be unique across every source (the default ids are)"
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
