"""What the image route does around its model, whichever runtime runs it.

:class:`FrameProcessor` decodes, describes (brightness, hue, faces, motion)
and batches frames, reuses a still source's last embedding
(``reuse_below``) and builds the features; a subclass supplies only
:meth:`FrameProcessor.embed`: torch (:class:`processors.image.ImageProcessor`)
or ONNX Runtime (:class:`processors.onnx_image.OnnxImageProcessor`). Nothing
here imports torch, so an edge install without it runs the ONNX route.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from engine.contracts.errors import ConfigError
from engine.contracts.types import Features, InputEvent, Modality
from processors import OPENCV_PIXEL_CAP
from processors.decode import OPENCV_MAX_PIXELS, U8Image, decode_image
from processors.params import ImageParams
from processors.vocabulary import IMAGE, ImageVocabulary

_MOTION_SOURCES = 4096

#: Face detection runs on a copy whose longer side is at most _FACE_SIDE
#: pixels, for faces of at least _FACE_MIN pixels (the cascade's 24 x 24 window).
_FACE_SIDE = 320.0
_FACE_MIN = 24
Embedding = npt.NDArray[np.float32]
log = logging.getLogger("autoglm.image")


def descriptors(bgr: U8Image) -> tuple[dict[str, float], U8Image]:
    """Brightness and a 4-bin hue histogram of the coloured pixels (grey ones
    have no hue). Returns the stats and a small ``(48, 64)`` grey frame."""
    small = cv2.resize(bgr, (64, 48), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
    hues = hsv[..., 0][hsv[..., 1] > 40]
    hist = np.bincount((hues.astype(np.int64) * 4) // 180, minlength=4)[:4] / max(1, hues.size)
    stats = {
        "brightness": float(gray.mean()) / 255.0,
        "hue_red": float(hist[0]),
        "hue_green": float(hist[1]),
        "hue_cyan": float(hist[2]),
        "hue_blue": float(hist[3]),
    }
    return stats, np.asarray(gray, dtype=np.uint8)


def motion(gray: U8Image, previous: U8Image | None) -> float:
    """Mean absolute difference of two small grey frames, 0..1."""
    if previous is None:
        return 0.0
    return float(np.abs(gray.astype(np.int16) - previous.astype(np.int16)).mean()) / 255.0


def to_input(bgr: U8Image, size: int) -> U8Image:
    """``(H, W, 3)`` BGR uint8 -> ``(size, size, 3)`` RGB uint8, the model's input
    before normalisation (which :func:`normalise` does once per batch)."""
    small = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
    return np.asarray(cv2.cvtColor(small, cv2.COLOR_BGR2RGB), dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class PreparedImage:
    source: str
    pixels: U8Image  # (S, S, 3) RGB, the model input
    small: U8Image  # (48, 64) grey, for motion against the source's previous frame
    stats: dict[str, float]
    thumbnail: bytes | None = None


class FrameProcessor:
    """Descriptors per frame and a batched embedding ``(D,)`` from :meth:`embed`."""

    modality: Modality = "image"
    vocabulary: ImageVocabulary = IMAGE

    def __init__(self, params: ImageParams) -> None:
        if OPENCV_MAX_PIXELS is not None and params.max_pixels > OPENCV_MAX_PIXELS:
            raise ConfigError(
                [
                    f"params.max_pixels = {params.max_pixels}: over OpenCV's own pixel cap of "
                    f"{OPENCV_MAX_PIXELS}, which OpenCV read from {OPENCV_PIXEL_CAP} when it loaded "
                    "(an earlier image route's max_pixels, or the environment); set "
                    f"{OPENCV_PIXEL_CAP}={params.max_pixels} or more before starting"
                ]
            )
        self.params = params
        self.max_fps = params.max_fps
        #: ImageNet labels of the model's classifier (empty: no labels).
        self.labels: list[str] = []
        #: What the engine versions the model by (engine.contracts.versions).
        self.model_name: str = params.model
        self.weight_files: tuple[str, ...] = ()
        # One face detector per thread: a CascadeClassifier keeps per-call
        # state in the object, and prepare() runs on several threads (the
        # route's prepare_threads, and its workers); sharing one gave OpenCV
        # assertion failures and heap corruption with frames of mixed sizes.
        # Per thread measured faster than one behind a lock: 1.00 vs 1.71 ms a
        # frame with two threads on two cores (1.60 ms with one thread).
        self._cascade = str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml")  # type: ignore[attr-defined]
        self._local = threading.local()
        if params.faces and self._face_detector().empty():
            raise ConfigError([f"params.faces = true: OpenCV cannot load {self._cascade}"])
        #: Frames whose face detection failed inside OpenCV: they keep their
        #: features without ``faces`` (never a ``decode_error``: the frame is fine).
        self.face_failures = 0
        self._previous: OrderedDict[str, U8Image] = OrderedDict()
        #: source -> (its last embedded frame's small grey copy, embedding, labels).
        self._kept: OrderedDict[str, tuple[U8Image, Embedding, list[str]]] = OrderedDict()
        #: Frames that reused their source's last embedding (``reuse_below``).
        self.reused = 0
        self._lock = threading.Lock()

    def _face_detector(self) -> cv2.CascadeClassifier:
        detector: cv2.CascadeClassifier | None = getattr(self._local, "faces", None)
        if detector is None:
            detector = self._local.faces = cv2.CascadeClassifier(self._cascade)
        return detector

    @property
    def counters(self) -> dict[str, int]:
        """What the processor did beside its features, by kind (for metrics)."""
        return {"reused": self.reused}

    @property
    def faults(self) -> dict[str, int]:
        """Internal failures that did not cost the event, by kind (for metrics)."""
        return {"face_detection": self.face_failures}

    def count_faces(self, bgr: U8Image) -> int | None:
        """Frontal faces of at least 24 pixels on a copy at most 320 pixels
        wide (0 with ``faces = false``); ``None`` when the detector failed
        (logged and counted)."""
        if not self.params.faces:
            return 0
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        h, w = gray.shape
        scale = min(1.0, _FACE_SIDE / max(h, w))
        if min(h, w) * scale < _FACE_MIN:  # an 8000 x 4 strip: no face fits, and resize would give 0 rows
            return 0
        if scale < 1.0:
            gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        try:
            found = self._face_detector().detectMultiScale(
                gray, scaleFactor=1.2, minNeighbors=5, minSize=(_FACE_MIN, _FACE_MIN)
            )
        except Exception as exc:  # OpenCV's own failure, not the producer's: the frame decoded
            with self._lock:
                self.face_failures += 1
            log.warning("face detection failed on a %dx%d frame: %s: %s", w, h, type(exc).__name__, exc)
            return None
        return len(found)

    def prepare(self, event: InputEvent) -> PreparedImage:
        bgr = decode_image(event.payload, event.content_type, self.params.max_pixels, self.params.input_size)
        stats, small = descriptors(bgr)
        faces = self.count_faces(bgr)
        if faces is not None:
            stats["faces"] = float(faces)
        thumb = None
        if self.params.thumbnail:
            scale = min(1.0, self.params.thumbnail / max(bgr.shape[:2]))
            resized = (
                cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else bgr
            )
            thumb = cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
        return PreparedImage(event.source, to_input(bgr, self.params.input_size), small, stats, thumb)

    def _motion(self, items: Sequence[PreparedImage]) -> list[float]:
        """Motion per frame against the previous frame of its source, in batch
        order (prepare may run in parallel threads; this part must not)."""
        out = []
        with self._lock:
            for it in items:
                out.append(motion(it.small, self._previous.get(it.source)))
                self._previous[it.source] = it.small
                self._previous.move_to_end(it.source)
            while len(self._previous) > _MOTION_SOURCES:
                self._previous.popitem(last=False)
        return out

    def _reusable(
        self, items: Sequence[PreparedImage]
    ) -> list[tuple[npt.NDArray[np.float32], list[str]] | None]:
        """Per frame, the embedding and labels it may reuse: its source's last
        embedded frame differs from it by less than ``reuse_below``. Measured
        against that frame, not the previous one, so a slow drift still ends
        in a fresh embedding."""
        limit = self.params.reuse_below
        if limit <= 0:
            return [None] * len(items)
        with self._lock:
            out: list[tuple[Embedding, list[str]] | None] = []
            for it in items:
                kept = self._kept.get(it.source)
                out.append(kept[1:] if kept is not None and motion(it.small, kept[0]) < limit else None)
            return out

    def _keep(
        self, items: Sequence[PreparedImage], vecs: npt.NDArray[np.float32], top: list[list[str]]
    ) -> None:
        with self._lock:
            for it, vec, labels in zip(items, vecs, top, strict=True):
                self._kept[it.source] = (it.small, vec, labels)
                self._kept.move_to_end(it.source)
            while len(self._kept) > _MOTION_SOURCES:
                self._kept.popitem(last=False)

    def embed(self, items: Sequence[PreparedImage]) -> tuple[Embedding, list[list[str]]]:
        """``B`` prepared frames -> ``(B, D)`` embeddings and each frame's top-5 labels."""
        raise NotImplementedError

    def run(self, items: Sequence[PreparedImage]) -> list[Features]:
        reuse = self._reusable(items)
        fresh = [it for it, r in zip(items, reuse, strict=True) if r is None]
        vecs, top = self.embed(fresh) if fresh else (np.zeros((0, 0), np.float32), [])
        if self.params.reuse_below > 0 and fresh:
            self._keep(fresh, vecs, top)
        moves = self._motion(items)
        out, j = [], 0
        for i, it in enumerate(items):
            kept = reuse[i]
            if kept is None:
                vec, labels, reused = vecs[j], top[j], 0.0
                j += 1
            else:
                (vec, labels), reused = kept, 1.0
            stats = {**it.stats, "motion": moves[i]}
            if self.params.reuse_below > 0:
                stats["reused"] = reused
            out.append(
                Features(
                    "image",
                    embedding=vec,
                    stats=stats,
                    labels=labels,
                    attachment=it.thumbnail,
                    vocabulary=self.vocabulary,
                )
            )
        with self._lock:
            self.reused += len(items) - len(fresh)
        return out


def top5(logits: npt.NDArray[np.float32], labels: Sequence[str]) -> list[list[str]]:
    """Each row's five best labels, best first (for a runtime without ``topk``)."""
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    return [[labels[i] for i in row] for row in idx.tolist()]
