"""Test media made at test time with PyAV itself: nothing is downloaded.

A few frames of a bar moving across a dark background and, with
``audio=True``, a 440 Hz sine track of the same length, in one mp4 (H.264 and
AAC where the wheel's FFmpeg has the encoders, MPEG-4 Part 2 otherwise).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np


def _video_codec() -> str:
    try:
        av.codec.Codec("libx264", "w")
    except Exception:  # an FFmpeg built without x264
        return "mpeg4"
    return "libx264"


def frame(i: int, width: int, height: int) -> np.ndarray[Any, Any]:
    """Frame ``i``: a red bar that moves right by 4 pixels a frame."""
    img = np.full((height, width, 3), 30, np.uint8)
    x = (i * 4) % width
    img[:, x : x + 8] = (0, 0, 255)
    return img


def _add_audio(out: Any, stream: Any, seconds: float, rate: int) -> None:
    n = round(seconds * rate)
    t = np.arange(n) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for start in range(0, n, 1024):
        chunk = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="flt", layout="mono")
        chunk.sample_rate, chunk.pts = rate, start
        for packet in stream.encode(chunk):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def make_video(
    path: Path, *, frames: int = 20, fps: int = 10, width: int = 64, height: int = 48, audio: bool = False
) -> Path:
    """Write ``frames`` frames at ``fps`` (and a sine track with ``audio``) to ``path``."""
    with av.open(str(path), "w") as out:
        video = out.add_stream(_video_codec(), rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream("aac", rate=16_000, layout="mono") if audio else None
        for i in range(frames):
            vf = av.VideoFrame.from_ndarray(frame(i, width, height), format="bgr24")
            vf.pts, vf.time_base = i, Fraction(1, fps)
            for packet in video.encode(vf):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if sound is not None:
            _add_audio(out, sound, frames / fps, 16_000)
    return path
