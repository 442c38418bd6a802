"""Image features: OpenCV decode, a torchvision CNN embedding, cheap descriptors.

Pure functions do the work (``image_size``, ``decode_image``, ``descriptors``,
``to_tensor``); :class:`ImageProcessor` holds the model and the per-source
motion state around them.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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
import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from engine.contracts.errors import ConfigError, DecodeError, EventRejected  # noqa: E402
from engine.contracts.types import ContentType, Features, InputEvent, Modality  # noqa: E402
from processors.devices import resolve_device, resolve_dtype, to_device  # noqa: E402
from processors.vocabulary import IMAGE, ImageVocabulary  # noqa: E402


def _opencv_cap() -> int | None:
    """The pixel cap OpenCV read when it loaded (None: a value we cannot read)."""
    try:
        return int(os.environ.get(OPENCV_PIXEL_CAP, str(1 << 30)))
    except ValueError:
        return None


#: OpenCV's own pixel cap in this process: fixed when cv2 loaded.
OPENCV_MAX_PIXELS: Final = _opencv_cap()

U8Image = npt.NDArray[np.uint8]
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_MOTION_SOURCES = 4096
#: Face detection runs on a copy whose longer side is at most _FACE_SIDE
#: pixels, for faces of at least _FACE_MIN pixels (the cascade's 24 x 24 window).
_FACE_SIDE = 320.0
_FACE_MIN = 24
Embedding = npt.NDArray[np.float32]
log = logging.getLogger("autoglm.image")


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


def normalise(batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, S, S, 3)`` uint8 RGB -> ``(B, 3, S, S)`` ImageNet-normalised ``dtype``.

    Runs on the model's device, so on CUDA the copy is uint8 (4x smaller).
    """
    mean = torch.as_tensor(_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.as_tensor(_STD, device=batch.device).view(1, 3, 1, 1)
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    return ((x - mean) / std).to(dtype)


def weights_file(params: ImageParams) -> Path | None:
    """Where ``weights = "imagenet"`` loads from (``None``: random weights, no file)."""
    if params.weights != "imagenet":
        return None
    if params.weights_path:
        return Path(params.weights_path)
    weights = getattr(torchvision.models, _WEIGHTS[params.model]).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


_WEIGHTS = {
    "mobilenet_v3_small": "MobileNet_V3_Small_Weights",
    "resnet18": "ResNet18_Weights",
    "resnet50": "ResNet50_Weights",
    "efficientnet_b0": "EfficientNet_B0_Weights",
}


def build_backbone(params: ImageParams) -> tuple[nn.Module, nn.Module, list[str]]:
    """(embedding model, classifier head, labels). Labels only with ImageNet weights."""
    builders = {
        "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, "MobileNet_V3_Small_Weights"),
        "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
        "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
        "efficientnet_b0": (torchvision.models.efficientnet_b0, "EfficientNet_B0_Weights"),
    }
    make, weights_enum = builders[params.model]
    torch.manual_seed(params.seed)
    model = make(weights=None)
    labels: list[str] = []
    if params.weights == "imagenet":
        weights = getattr(torchvision.models, weights_enum).DEFAULT
        if params.weights_path:
            path = Path(params.weights_path)
        else:
            path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not path.is_file():
            raise ConfigError(
                [
                    f'params.weights = "imagenet": no weights file at {path}; put the torchvision '
                    f"checkpoint {Path(weights.url).name} there, set params.weights_path, "
                    'or use weights = "random"'
                ]
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (RuntimeError, OSError, ValueError) as exc:
            raise ConfigError([f"params.weights_path = {str(path)!r}: cannot load: {exc}"]) from exc
        labels = list(weights.meta["categories"])
    head: nn.Module
    if hasattr(model, "fc"):
        head, model.fc = model.fc, nn.Identity()
    else:
        head, model.classifier = model.classifier, nn.Identity()
    return model.eval(), head.eval(), labels


@dataclass(frozen=True, slots=True)
class PreparedImage:
    source: str
    pixels: U8Image  # (S, S, 3) RGB, the model input
    small: U8Image  # (48, 64) grey, for motion against the source's previous frame
    stats: dict[str, float]
    thumbnail: bytes | None = None


class ImageProcessor:
    """CNN embedding ``(D,)`` per frame plus descriptors; batched forward."""

    modality: Modality = "image"
    vocabulary: ImageVocabulary = IMAGE

    def __init__(self, params: ImageParams, device: str = "auto", dtype: str = "float32") -> None:
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
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        model, head, labels = build_backbone(params)
        self.model = model.to(self.device, self.dtype)
        self.head = head.to(self.device, self.dtype)
        self.labels = labels
        #: What the engine versions the model by (engine.contracts.versions).
        self.model_name = params.model
        path = weights_file(params)
        self.weight_files = (str(path),) if path is not None else ()
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

    @torch.inference_mode()
    def embed(self, items: Sequence[PreparedImage]) -> tuple[Embedding, list[list[str]]]:
        """``B`` prepared frames -> ``(B, D)`` embeddings and each frame's top-5 labels."""
        batch = torch.from_numpy(np.stack([it.pixels for it in items]))  # (B, S, S, 3) uint8
        emb = self.model(normalise(to_device(batch, self.device), self.dtype))  # (B, D)
        top: list[list[str]] = [[] for _ in items]
        if self.labels:
            idx = self.head(emb).topk(5, dim=1).indices.cpu().tolist()  # (B, 5)
            top = [[self.labels[i] for i in row] for row in idx]
        return emb.float().cpu().numpy(), top

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


def create(params: ImageParams, modality: Modality, device: str, dtype: str) -> ImageProcessor:
    return ImageProcessor(params, device, dtype)
