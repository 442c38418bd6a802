"""One FFmpeg input as a stream of events: demux, decode, stamp, pace, loop.

Timestamps:

- **live** (a network stream, a device): the capture time, the clock when the
  frame was decoded;
- **a file**: its presentation timestamps mapped onto the wall clock, so
  frames keep the spacing the file gives them (and a file's audio and video
  line up). ``realtime`` paces at the file's rate from the moment it opens;
  otherwise the file goes as fast as it decodes and its timeline is placed so
  that it *ends* when publishing starts: every timestamp is then in the past,
  where the engine accepts it (it refuses events more than
  ``aligner.max_future_ms`` ahead of its clock).
- ``loop``: each pass of a file continues where the last one ended (its last
  frame's time plus that frame's duration): the timeline never repeats.

Everything here blocks (FFmpeg reads and decodes); :mod:`engine.sources.pump`
runs it on a thread of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import av

from engine.contracts.errors import SourceError
from engine.sources.audio import Chunker
from engine.sources.media import (
    Item,
    cause,
    demuxed_length_ns,
    duration_ns,
    is_live,
    open_input,
    pick_streams,
    start_time,
)
from engine.sources.video import FramePicker, frame_body


@dataclass(frozen=True, slots=True)
class MediaOptions:
    """How to read one input (``autoglm publish --video/--audio`` flags)."""

    video: bool = True
    audio: bool = False
    fps: float | None = None
    quality: int | None = 90  # None: raw BGR
    chunk_ms: int = 100
    loop: bool = False
    realtime: bool = True  # files only: pace at the file's rate
    timeout: float = 10.0  # opening, and each read of a stream
    input_format: str | None = None  # FFmpeg's -f: alsa, mjpeg, mpegts...
    live: bool | None = None  # None: a URL with a scheme, or a device, is live


class MediaReader:
    """Reads ``url`` per ``options``; :meth:`items` yields the events."""

    def __init__(self, url: str, options: MediaOptions) -> None:
        self.url, self.options = url, options
        self.live = is_live(url) if options.live is None else options.live
        if options.loop and self.live:
            raise SourceError(f"{url}: --loop is for files, and this is a live stream")
        if options.loop and not options.realtime:
            raise SourceError(
                "--loop with --as-fast-as-possible would run ahead of the clock without end "
                "(the engine refuses events more than max_future_ms ahead)"
            )
        if not (options.video or options.audio):
            raise SourceError(f"{url}: nothing to read (neither video nor audio)")
        self.picker = FramePicker(options.fps)
        self.undecodable = 0
        self.passes = 0

    def items(self, stop: threading.Event) -> Iterator[Item]:
        """Every event of the input (every pass, with ``loop``) until ``stop`` is set."""
        opts = self.options
        container = open_input(self.url, timeout=opts.timeout, input_format=opts.input_format)
        anchor = time.time_ns()
        if not self.live and not opts.realtime:
            # Placed so the file ends now: every timestamp is then in the past.
            length = duration_ns(container)
            if length is None:  # the container does not say: count its packets first
                length = demuxed_length_ns(container)
                container.close()
                container = open_input(self.url, timeout=opts.timeout, input_format=opts.input_format)
            anchor -= length
        started = time.monotonic()
        offset = 0  # ns of the earlier passes
        while True:
            self.passes += 1
            try:
                length = yield from self._one_pass(container, anchor + offset, offset, started, stop)
            finally:
                container.close()
            if not opts.loop or stop.is_set() or length == 0:
                return
            offset += length
            container = open_input(self.url, timeout=opts.timeout, input_format=opts.input_format)

    def _one_pass(
        self, container: Any, anchor: int, offset: int, started: float, stop: threading.Event
    ) -> Generator[Item, None, int]:
        """One pass over an open input; returns its length in ns (the loop's step)."""
        opts = self.options
        streams = pick_streams(container, self.url, video=opts.video, audio=opts.audio)
        origin = start_time(container)
        chunker = Chunker(opts.chunk_ms)
        end = 0
        for packet in self._packets(container, streams):
            try:
                frames = packet.decode()
            except av.InvalidDataError:
                self.undecodable += 1  # one damaged packet: FFmpeg goes on with the next
                continue
            for frame in frames:
                if stop.is_set():
                    return end
                if frame.time is None:
                    continue
                if origin is None:
                    origin = frame.time
                rel = round((frame.time - origin) * 1e9)
                end = max(end, rel + _duration_ns(frame))
                if self.live:
                    ts = time.time_ns()
                else:
                    ts = anchor + rel
                    if opts.realtime and (wait := started + (offset + rel) / 1e9 - time.monotonic()) > 0:
                        stop.wait(wait)
                if isinstance(frame, av.VideoFrame):
                    if self.picker.keep(ts):
                        yield Item("image", ts, *frame_body(frame, opts.quality))
                else:
                    for cts, body, ct in chunker.add(frame, ts):
                        yield Item("audio", cts, body, ct)
        for cts, body, ct in chunker.flush():
            yield Item("audio", cts, body, ct)
        return end

    def _packets(self, container: Any, streams: list[Any]) -> Iterator[Any]:
        """Demuxed packets; a stream that stalls or breaks is a :class:`SourceError`."""
        packets = container.demux(*streams)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.ExitError as exc:
                raise SourceError(f"{self.url}: stopped sending for {self.options.timeout:g} s") from exc
            except (av.FFmpegError, OSError) as exc:
                raise SourceError(f"{self.url}: read failed: {cause(exc)}") from exc
            yield packet


def _duration_ns(frame: Any) -> int:
    """How long a frame lasts: samples at the rate (audio), its duration field (video)."""
    if isinstance(frame, av.AudioFrame):
        return frame.samples * 1_000_000_000 // frame.sample_rate
    if frame.duration and frame.time_base is not None:
        ns: int = round(frame.duration * frame.time_base * 1_000_000_000)
        return ns
    return 0
