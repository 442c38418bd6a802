"""A camera through OpenCV, where PyAV cannot open it.

The ``av`` wheel's FFmpeg is built without device inputs for video (no
``v4l2``; ``alsa`` is there for audio), so a V4L2 camera (``/dev/video0``)
or a camera by index (``0``) is read with OpenCV's ``VideoCapture`` instead
(``opencv-python-headless`` is already a dependency, and has a V4L2 backend
on Linux). Everything else goes through PyAV (:mod:`engine.sources.reader`).

Frames are stamped with the capture time, picked by ``--fps`` and encoded as
the PyAV path does; a camera is live: no loop, no audio track.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import av

from engine.contracts.errors import SourceError
from engine.sources.media import Item
from engine.sources.producer import encode_frame
from engine.sources.reader import MediaOptions
from engine.sources.video import FramePicker

_DEVICE = re.compile(r"/dev/video\d+|\d{1,3}")


def needs_opencv(url: str, input_format: str | None = None) -> bool:
    """A camera that the installed FFmpeg has no input format for."""
    if not _DEVICE.fullmatch(url):
        return False
    wanted = input_format or "v4l2"
    return wanted not in av.formats_available


class CameraReader:
    """Reads a camera; :meth:`items` yields its frames as image events."""

    live = True

    def __init__(self, device: str, options: MediaOptions) -> None:
        if options.audio:
            raise SourceError(
                f"{device}: a camera has no audio track here; publish a microphone with --audio"
            )
        if options.loop:
            raise SourceError(f"{device}: --loop is for files, and this is a camera")
        self.device, self.options = device, options
        self.picker = FramePicker(options.fps)
        self.passes = 1

    def items(self, stop: threading.Event) -> Iterator[Item]:
        source: int | str = int(self.device) if self.device.isdigit() else self.device
        # OpenCV warns on stderr for each backend it tries; the one line below says it all.
        import cv2  # on first use: an engine's image route loads OpenCV first, with its pixel cap

        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            capture = cv2.VideoCapture(source, cv2.CAP_V4L2 if isinstance(source, str) else cv2.CAP_ANY)
        finally:
            cv2.utils.logging.setLogLevel(level)
        try:
            if not capture.isOpened():
                raise SourceError(f"{self.device}: cannot open the camera (OpenCV)")
            silent_since = time.monotonic()
            while not stop.is_set():
                ok, frame = capture.read()
                if not ok:
                    if time.monotonic() - silent_since > self.options.timeout:
                        raise SourceError(f"{self.device}: stopped sending for {self.options.timeout:g} s")
                    stop.wait(0.01)
                    continue
                silent_since = time.monotonic()
                ts = time.time_ns()
                if self.picker.keep(ts):
                    yield Item("image", ts, *encode_frame(frame, self.options.quality))
        finally:
            capture.release()
