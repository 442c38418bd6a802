"""Opening an FFmpeg input: a file, a network stream or a capture device.

PyAV (FFmpeg's libraries, from the ``av`` wheel) opens anything its FFmpeg
opens: mp4/mkv/avi files, ``rtsp://``, ``http(s)://`` (MJPEG, HLS),
``udp://``/``tcp://`` MPEG-TS, or an ALSA microphone through
``input_format``. (The wheel has no V4L2 or Pulse input: cameras go through
OpenCV, engine/sources/camera.py.) Its errors are translated here into one
:class:`SourceError` line that names the input and the cause, so a wrong
path, a file that is not media, an unreachable stream and a codec without a
decoder each read as what they are.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import av

from engine.contracts.errors import SourceError
from engine.contracts.types import Modality

if TYPE_CHECKING:
    from av.container import InputContainer


@dataclass(frozen=True, slots=True)
class Item:
    """One event ready to publish: what a source yields to the producer."""

    modality: Modality
    ts: int
    body: bytes
    content_type: str


def is_live(url: str) -> bool:
    """A stream or a device (its timestamps are capture times), not a file
    (its timestamps are presentation times mapped onto the clock)."""
    scheme = urlsplit(url).scheme
    if len(scheme) > 1 and scheme != "file":  # a Windows drive letter is no scheme
        return True
    path = url.removeprefix("file://")
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)  # /dev/video0, a FIFO
    except OSError:
        return False  # missing: opening it says so


def cause(exc: BaseException) -> str:
    """FFmpeg's reason without the errno and the repeated URL PyAV adds."""
    if isinstance(exc, av.FFmpegError) and exc.strerror:
        return str(exc.strerror)
    return str(exc) or type(exc).__name__


def open_input(
    url: str, *, timeout: float = 10.0, input_format: str | None = None, options: dict[str, str] | None = None
) -> InputContainer:
    """Open ``url`` for reading, or raise :class:`SourceError` with one clear line.

    ``timeout`` bounds opening and each read, so an address where nothing
    answers fails in that time instead of hanging."""
    opts = dict(options or {})
    if urlsplit(url).scheme == "rtsp":
        opts.setdefault("rtsp_transport", "tcp")  # UDP through NAT or a firewall often gets nothing
    try:
        container: InputContainer = av.open(
            url, mode="r", format=input_format, options=opts, timeout=(timeout, timeout)
        )
    except av.FileNotFoundError as exc:
        raise SourceError(f"{url}: no such file") from exc
    except av.InvalidDataError as exc:
        raise SourceError(f"{url}: not a media file or stream FFmpeg can read ({cause(exc)})") from exc
    except av.ExitError as exc:  # PyAV's timeout interrupts FFmpeg with this
        raise SourceError(f"{url}: nothing answered within {timeout:g} s") from exc
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise SourceError(f"{url}: cannot open: {cause(exc)}") from exc
    return container


def pick_streams(container: InputContainer, url: str, *, video: bool, audio: bool) -> list[Any]:
    """The first video and/or audio stream, each with a decoder; else :class:`SourceError`."""
    picked: list[Any] = []
    for kind, wanted, streams in (
        ("video", video, container.streams.video),
        ("audio", audio, container.streams.audio),
    ):
        if not wanted:
            continue
        if not streams:
            container.close()
            raise SourceError(f"{url}: has no {kind} stream")
        stream = streams[0]
        try:
            ctx: Any = stream.codec_context  # PyAV makes it on first access: no decoder may raise here
        except (av.FFmpegError, ValueError) as exc:
            container.close()
            raise SourceError(f"{url}: unsupported {kind} codec: {cause(exc)}") from exc
        if ctx is None or ctx.codec is None:
            container.close()
            raise SourceError(f"{url}: unsupported {kind} codec (FFmpeg has no decoder for it)")
        picked.append(stream)
    return picked


def start_time(container: InputContainer) -> float | None:
    """The container's first presentation time in seconds, when it says."""
    return None if container.start_time is None else container.start_time / 1_000_000


def duration_ns(container: InputContainer) -> int | None:
    """The container's duration in ns, when it says (files do, live streams do not)."""
    return None if container.duration is None else container.duration * 1000


def demuxed_length_ns(container: InputContainer) -> int:
    """The input's length in ns read off its packets (demuxed, not decoded):
    for files whose container does not say (a raw ``.m4v``, some ``.mkv``).
    Reads the whole file once; the caller opens it again to decode."""
    first: float | None = None
    last = 0.0
    for packet in container.demux():
        if packet.pts is None or packet.time_base is None:
            continue
        at = float(packet.pts * packet.time_base)
        end = at + float((packet.duration or 0) * packet.time_base)
        first = at if first is None else min(first, at)
        last = max(last, end)
    return 0 if first is None else int((last - first) * 1e9)
