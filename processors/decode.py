"""Image decoding: the header read before any pixel, and OpenCV's decode.

Torch-free, so the ONNX runtime of the image route (:mod:`processors.onnx_image`)
uses the very same checks as the torch one. A decompression bomb is refused
from its header (:func:`image_size`); OpenCV's own pixel cap is the backstop.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Final

from processors import OPENCV_PIXEL_CAP, cap_opencv_pixels
from processors.params import ImageParams

# Before the first ``import cv2``, which reads the cap once. The registry has
# usually set it from the route's max_pixels already; this is the default for
# code that imports this module directly.
cap_opencv_pixels(ImageParams.model_fields["max_pixels"].default)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

from engine.contracts.errors import DecodeError, EventRejected  # noqa: E402
from engine.contracts.types import ContentType  # noqa: E402


def _opencv_cap() -> int | None:
    """The pixel cap OpenCV read when it loaded (None: a value we cannot read)."""
    try:
        return int(os.environ.get(OPENCV_PIXEL_CAP, str(1 << 30)))
    except ValueError:
        return None


#: OpenCV's own pixel cap in this process: fixed when cv2 loaded.
OPENCV_MAX_PIXELS: Final = _opencv_cap()

U8Image = npt.NDArray[np.uint8]


#: Start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 (0xC4 is DHT, 0xC8 JPG, 0xCC DAC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: Markers libjpeg takes without a length after them: TEM and RST0-7.
_JPEG_BARE = frozenset({0x01, *range(0xD0, 0xD8)})
#: Markers followed by a length that libjpeg skips or reads to the end of:
#: DHT, DAC, DQT, DNL, DRI, APP0-15, COM.
_JPEG_SEGMENTS = frozenset({0xC4, 0xCC, 0xDB, 0xDC, 0xDD, *range(0xE0, 0xF0), 0xFE})
_NOT_FF = re.compile(rb"[^\xff]")


def jpeg_size(payload: bytes) -> tuple[int, int]:
    """(width, height) of a JPEG's first frame header, found the way libjpeg
    (OpenCV's JPEG decoder) finds it, so that the size checked is the size
    decoded.

    A walk that reads a length after every marker can be led astray: TEM
    (0xFF01) and RST0-7 have none, so a hostile file can hide a small fake
    frame header where such a walk lands, while libjpeg reads the real,
    huge one. Here markers are found as libjpeg's ``next_marker`` finds them
    (skipping stray bytes, fill bytes and stuffed zeros), TEM and RSTn take
    no length, and any marker libjpeg would stop at before a frame header
    (SOI again, SOS, EOI, reserved ones) ends the walk as ``decode_error``.
    """
    if payload[:2] != b"\xff\xd8":
        raise DecodeError("decode_error", "body is not a JPEG file (no SOI marker)")
    i, n = 2, len(payload)
    while True:
        # libjpeg's next_marker(): skip anything up to an 0xFF, then any 0xFF
        # fill bytes; the byte after them is the marker (0x00: a stuffed zero).
        # find() and one search: linear however many 0xFF bytes there are.
        ff = payload.find(b"\xff", i)
        after = _NOT_FF.search(payload, ff + 1) if ff >= 0 else None
        if after is None:
            raise DecodeError("decode_error", "corrupt JPEG: no frame header found")
        i = after.end()
        marker = payload[i - 1]
        if marker in _JPEG_SOF:  # length (2), precision (1), height (2), width (2)
            if i + 7 > n:
                raise DecodeError("decode_error", "truncated JPEG: frame header cut short")
            h, w = struct.unpack_from(">HH", payload, i + 3)
            return int(w), int(h)
        if marker == 0x00 or marker in _JPEG_BARE:
            continue
        if marker not in _JPEG_SEGMENTS:
            raise DecodeError(
                "decode_error", f"corrupt JPEG: marker 0x{marker:02X} at byte {i - 2} before any frame header"
            )
        if i + 2 > n:
            raise DecodeError("decode_error", "truncated JPEG: segment length cut short")
        i += max(2, struct.unpack_from(">H", payload, i)[0])  # the length counts its own 2 bytes


def image_size(payload: bytes, ct: ContentType) -> tuple[int, int]:
    """(width, height) read from the header alone, so a decompression bomb is
    refused before a single pixel is decoded."""
    if ct.mime == "image/x-raw":
        return int(ct.params["width"]), int(ct.params["height"])
    if ct.mime == "image/png":
        if len(payload) < 24 or payload[:8] != b"\x89PNG\r\n\x1a\n" or payload[12:16] != b"IHDR":
            raise DecodeError("decode_error", "body is not a PNG file (bad signature or IHDR)")
        w, h = struct.unpack(">II", payload[16:24])
        return int(w), int(h)
    return jpeg_size(payload)


def decode_image(payload: bytes, ct: ContentType, max_pixels: int, min_side: int = 0) -> U8Image:
    """Decode to an ``(H, W, 3)`` uint8 BGR array, refusing oversized images first.

    A JPEG whose shorter side is at least ``2 * min_side`` is decoded at half
    (or quarter) size by libjpeg's DCT scaling: the CNN never sees more than
    ``min_side`` pixels anyway, and it saves most of the decode.
    """
    w, h = image_size(payload, ct)
    if w <= 0 or h <= 0:
        raise DecodeError("decode_error", f"image header says {w}x{h} pixels")
    if w * h > max_pixels:
        raise EventRejected(
            "image_too_large", f"image is {w}x{h} = {w * h} pixels, over max_pixels = {max_pixels}"
        )
    if ct.mime == "image/x-raw":
        if len(payload) != w * h * 3:
            raise DecodeError(
                "decode_error",
                f"raw bgr8 {w}x{h} needs {w * h * 3} bytes, body has {len(payload)}",
            )
        return np.frombuffer(payload, dtype=np.uint8).reshape(h, w, 3)
    # libjpeg decodes a cut-off file into a partly grey image without an
    # error, so check the end markers ourselves.
    tail = payload.rstrip(b"\x00")
    if ct.mime == "image/jpeg" and not tail.endswith(b"\xff\xd9"):
        raise DecodeError("decode_error", f"truncated JPEG: no end-of-image marker ({len(payload)} bytes)")
    if ct.mime == "image/png" and b"IEND" not in payload[-16:]:
        raise DecodeError("decode_error", f"truncated PNG: no IEND chunk ({len(payload)} bytes)")
    flag = cv2.IMREAD_COLOR
    if ct.mime == "image/jpeg" and min_side:
        if min(w, h) >= 4 * min_side:
            flag = cv2.IMREAD_REDUCED_COLOR_4
        elif min(w, h) >= 2 * min_side:
            flag = cv2.IMREAD_REDUCED_COLOR_2
    try:
        img = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), flag)
    except cv2.error as exc:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):  # the backstop held where the header check did not
            raise EventRejected(
                "image_too_large",
                f"OpenCV refused to decode it: over its own cap of {OPENCV_MAX_PIXELS} pixels",
            ) from None
        raise DecodeError("decode_error", f"OpenCV could not decode the {ct.mime} body: {exc}") from None
    if img is None:
        raise DecodeError("decode_error", f"OpenCV could not decode the {ct.mime} body")
    return np.asarray(img, dtype=np.uint8)
