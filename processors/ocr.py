"""Text in images: RapidOCR's PP-OCRv4 detection and recognition (Chinese and English).

The ``rapidocr-onnxruntime`` wheel ships the ONNX models; onnxruntime runs
them on the CPU, about 0.1-0.3 s for a 640x480 frame on one core: tens
of times a CNN pass. Text in a scene changes slowly, so each source's frames
are read at most ``ocr_fps`` times per second of event time; the frames in
between pass unread (their header is still checked) and carry no lines. A
window's lines are de-duplicated when they fuse
(:class:`processors.vocabulary.OCRVocabulary`).

The wheel declares ``opencv-python``, which would install a second ``cv2``
over our ``opencv-python-headless``: it is installed with ``--no-deps`` plus
its real dependencies (the ``ocr`` extra in pyproject.toml; README, "Words").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from engine.contracts.errors import ConfigError, DecodeError
from engine.contracts.types import Features, InputEvent, Modality
from processors.decode import U8Image, decode_image, image_size
from processors.params import OCRParams
from processors.vocabulary import OCR, OCRVocabulary


def load_engine(params: OCRParams) -> Any:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as exc:
        raise ConfigError(
            [
                "processor ocr needs rapidocr-onnxruntime: pip install --no-deps "
                "rapidocr-onnxruntime==1.4.4 pyclipper shapely six (README, 'Words')"
            ]
        ) from exc
    return RapidOCR(
        det_limit_side_len=params.max_side,
        det_limit_type="max",
        use_cls=params.rotated,
        intra_op_num_threads=params.threads,
        inter_op_num_threads=1,
    )


class PerSource:
    """At most ``per_s`` events per source by event time: the rest pass unread
    (decode threads race here, hence the lock)."""

    def __init__(self, per_s: float, max_sources: int) -> None:
        self.interval_ns = int(1e9 / per_s)
        self.max_sources = max_sources
        self._due: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def due(self, source: str, ts_ns: int) -> bool:
        with self._lock:
            due = self._due.pop(source, None)
            if due is not None and ts_ns < due:
                self._due[source] = due
                return False
            self._due[source] = ts_ns + self.interval_ns
            if len(self._due) > self.max_sources:
                self._due.popitem(last=False)
            return True


def check_header(event: InputEvent) -> None:
    """A frame passed unread is still refused when its header is not an image's."""
    w, h = image_size(event.payload, event.content_type)
    if w <= 0 or h <= 0:
        raise DecodeError("decode_error", f"image header says {w}x{h} pixels")


@dataclass(frozen=True, slots=True)
class PreparedFrame:
    #: ``None``: not due for reading (``ocr_fps``).
    image: U8Image | None


class OCRProcessor:
    """``labels``: the lines read in a frame, top to bottom, at least ``min_score`` sure."""

    modality: Modality = "image"
    vocabulary: OCRVocabulary = OCR

    def __init__(self, params: OCRParams) -> None:
        self.params = params
        self.engine = load_engine(params)
        self.rate = PerSource(params.ocr_fps, params.max_sources)
        self._lock = threading.Lock()  # one RapidOCR, one frame at a time

    def prepare(self, event: InputEvent) -> PreparedFrame:
        if not self.rate.due(event.source, event.ts_ns):
            check_header(event)
            return PreparedFrame(None)
        bgr = decode_image(event.payload, event.content_type, self.params.max_pixels)
        scale = self.params.max_side / max(bgr.shape[:2])
        if scale < 1:
            small = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            bgr = np.asarray(small, dtype=np.uint8)
        return PreparedFrame(np.ascontiguousarray(bgr))

    def read(self, bgr: U8Image) -> list[str]:
        """The lines RapidOCR finds in a BGR frame, top to bottom."""
        with self._lock:
            found, _ = self.engine(bgr)
        lines = [
            (min(p[1] for p in box), str(text).strip())
            for box, text, score in (found or [])
            if float(score) >= self.params.min_score and str(text).strip()
        ]
        return [text for _, text in sorted(lines)]

    def run(self, items: Sequence[PreparedFrame]) -> list[Features]:
        return [
            Features("image", labels=self.read(it.image) if it.image is not None else (), vocabulary=OCR)
            for it in items
        ]


def create(params: OCRParams, modality: Modality, device: str, dtype: str) -> OCRProcessor:
    # RapidOCR's onnxruntime build runs on the CPU whatever the route's device.
    return OCRProcessor(params)
