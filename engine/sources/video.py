"""Decoded video frames into image events: the ``--fps`` pick and the body.

A frame becomes JPEG at ``quality`` (``image/jpeg``) or raw BGR
(``image/x-raw;format=bgr8;width=W;height=H``, ``quality=None``): JPEG costs
the producer an encode and saves the network ~10x; raw costs nothing to make
but is W x H x 3 bytes a frame, which goes through the claim check above the
server's max payload (1 MiB by default: 640 x 480 is 900 KiB).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.sources.producer import encode_frame

if TYPE_CHECKING:
    from av import VideoFrame


class FramePicker:
    """Keeps at most ``fps`` frames a second of event time, dropping the rest.

    The pick goes by timestamp, not by counting frames, so a variable-rate
    stream and a 29.97 fps file thin out evenly: a frame is kept when it is
    at or past the next due time, and the due time then moves one interval on
    (or past a gap in the stream, to the frame's time plus one interval)."""

    def __init__(self, fps: float | None) -> None:
        self.interval = 0 if fps is None else round(1e9 / fps)
        self.due: int | None = None
        self.skipped = 0

    def keep(self, ts: int) -> bool:
        if self.interval == 0:
            return True
        if self.due is not None and ts < self.due:
            self.skipped += 1
            return False
        following = ts + self.interval if self.due is None else self.due + self.interval
        self.due = following if following > ts else ts + self.interval
        return True


def frame_body(frame: VideoFrame, quality: int | None) -> tuple[bytes, str]:
    """The event body and content type of one decoded frame."""
    return encode_frame(frame.to_ndarray(format="bgr24"), quality)
