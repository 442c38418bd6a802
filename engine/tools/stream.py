"""``autoglm publish --video/--audio/--text-file/--text -``: a source through the Producer.

A reader (:mod:`engine.sources.reader` or :mod:`engine.sources.text`) runs
on its own thread behind a :class:`~engine.sources.pump.Pump`; each event
it yields is published by the :class:`~engine.sources.producer.Producer`.
A live stream, or a file paced at its own rate, drops what the producer
cannot take in time; a file sent as fast as possible and text never drop.
Once a second a progress line goes to stderr; at the end (or on Ctrl-C) a
summary to stdout says what was sent, dropped and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TextIO

from engine.contracts.errors import AutoGLMError
from engine.contracts.types import Modality
from engine.sources.camera import CameraReader, needs_opencv
from engine.sources.media import Item
from engine.sources.producer import Producer
from engine.sources.pump import Pump
from engine.sources.reader import MediaOptions, MediaReader
from engine.sources.text import TextReader


@dataclass
class Tally:
    """What one run sent, for the progress line and the summary."""

    started: float = field(default_factory=time.monotonic)
    sent: Counter[Modality] = field(default_factory=Counter)
    types: dict[Modality, str] = field(default_factory=dict)
    last_ts: dict[Modality, int] = field(default_factory=dict)

    def line(self, dropped: int, skipped: int) -> str:
        took = max(time.monotonic() - self.started, 1e-9)
        total = sum(self.sent.values())
        counts = ", ".join(f"{n} {m}" for m, n in sorted(self.sent.items())) or "nothing"
        return (
            f"{counts} sent in {took:.1f} s ({total / took:.1f}/s); dropped {dropped} (slower than the "
            f"source), skipped {skipped} (--fps)"
        )


async def publish_stream(
    producer: Producer,
    *,
    video: str | None = None,
    audio: str | None = None,
    text_file: str | None = None,
    follow: bool = False,
    media: MediaOptions | None = None,
    progress: bool = True,
    out: TextIO | None = None,
    interval: float = 1.0,
) -> Tally:
    """Publish one source until it ends (or SIGINT); returns the tally. The
    producer must be open (inside its ``async with``)."""
    media = media or MediaOptions()
    out = out or sys.stdout
    reader: MediaReader | CameraReader | TextReader
    if video is not None and needs_opencv(video, media.input_format):
        reader, drop = CameraReader(video, replace(media, video=True)), True
    elif video is not None:
        reader = MediaReader(video, replace(media, video=True))
        drop = reader.live or media.realtime
    elif audio is not None:
        reader = MediaReader(audio, replace(media, video=False, audio=True))
        drop = reader.live or media.realtime
    elif text_file is not None:
        reader, drop = TextReader(text_file, follow=follow), False
    else:
        raise AutoGLMError("nothing to publish: give --video, --audio, --text-file or --text -")
    pump: Pump[Item] = Pump(reader.items, drop=drop)
    tally = Tally()
    picker = None if isinstance(reader, TextReader) else reader.picker

    def skipped() -> int:
        return picker.skipped if picker is not None else 0

    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals here (a thread, Windows)
        loop.add_signal_handler(signal.SIGINT, pump.finish)  # Ctrl-C: stop reading, then the summary
    try:
        shown = time.monotonic()
        async for item in pump:
            await producer.send(item.modality, item.body, item.content_type, item.ts)
            tally.sent[item.modality] += 1
            tally.types.setdefault(item.modality, item.content_type)
            tally.last_ts[item.modality] = item.ts
            if progress and time.monotonic() - shown >= interval:
                shown = time.monotonic()
                print(f"autoglm publish: {tally.line(pump.dropped, skipped())}", file=sys.stderr, flush=True)
        await producer.flush()
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    for modality, n in sorted(tally.sent.items()):
        subject = producer.subjects.input(producer.source, modality)
        print(f"published {n} {modality} event(s) on {subject} ({tally.types[modality]})", file=out)
    print(f"{tally.line(pump.dropped, skipped())}; trace {producer.traceparent}", file=out)
    if producer.claim_checked:
        print(f"{producer.claim_checked} event(s) went through the claim check ({producer.bucket})", file=out)
    if producer.duplicates:
        raise AutoGLMError(
            f"the input stream already held event id(s) {', '.join(producer.duplicates[:5])}: it dropped "
            "these events as duplicates. Ids must be unique across every source (the default ids are)"
        )
    if not tally.sent:
        raise AutoGLMError(f"{video or audio or text_file}: nothing to publish in it")
    return tally
