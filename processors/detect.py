"""Object labels: a torchvision COCO detector (SSDlite or Faster R-CNN, MobileNetV3).

``weights = "coco"`` loads torchvision's checkpoint from ``weights_path`` or
the torch hub cache; :class:`processors.params.DetectParams` refuses the
config when the file is not there (nothing is downloaded). ``random`` builds
the same network untrained: for tests of shapes and paths. Like OCR, each
source's frames are looked at ``detect_fps`` times per second of event time;
the others pass unread. A frame's labels keep their repeats (two people are
``["person", "person"]``); :class:`processors.vocabulary.DetectVocabulary`
counts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision

from engine.contracts.errors import ConfigError
from engine.contracts.types import Features, InputEvent, Modality
from processors.decode import decode_image
from processors.devices import resolve_device
from processors.ocr import PerSource, check_header
from processors.params import DetectParams
from processors.vocabulary import DETECT, DetectVocabulary

_MODELS = {
    "ssdlite": ("ssdlite320_mobilenet_v3_large", "SSDLite320_MobileNet_V3_Large_Weights"),
    "fasterrcnn_mobilenet": (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights",
    ),
}


def build_detector(params: DetectParams) -> tuple[torch.nn.Module, list[str]]:
    """The network (its weights loaded when ``coco``) and the COCO category names."""
    make, weights_enum = _MODELS[params.model]
    detection = torchvision.models.detection
    torch.manual_seed(params.seed)
    model: torch.nn.Module = getattr(detection, make)(weights=None, weights_backbone=None, num_classes=91)
    if params.weights == "coco":
        path = params.checkpoint()
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, ValueError) as exc:
            raise ConfigError([f"detect params.weights_path = {str(path)!r}: cannot load: {exc}"]) from exc
    labels = list(getattr(detection, weights_enum).COCO_V1.meta["categories"])
    return model.eval(), labels


@dataclass(frozen=True, slots=True)
class PreparedFrame:
    #: ``(3, H, W)`` float RGB in 0..1, or ``None``: not due (``detect_fps``).
    image: torch.Tensor | None


class DetectProcessor:
    """``labels``: the objects found in a frame at least ``min_score`` sure, with repeats."""

    modality: Modality = "image"
    vocabulary: DetectVocabulary = DETECT

    def __init__(self, params: DetectParams, device: str) -> None:
        self.params = params
        self.device = resolve_device(device)
        model, self.labels = build_detector(params)
        self.model = model.to(self.device)
        self.rate = PerSource(params.detect_fps, params.max_sources)

    def prepare(self, event: InputEvent) -> PreparedFrame:
        if not self.rate.due(event.source, event.ts_ns):
            check_header(event)
            return PreparedFrame(None)
        bgr = decode_image(event.payload, event.content_type, self.params.max_pixels)
        rgb = torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1).float().div_(255.0)
        return PreparedFrame(rgb)

    @torch.inference_mode()
    def run(self, items: Sequence[PreparedFrame]) -> list[Features]:
        due = [i for i, it in enumerate(items) if it.image is not None]
        found: dict[int, list[str]] = {}
        if due:
            images = [items[i].image.to(self.device) for i in due]  # type: ignore[union-attr]
            for i, out in zip(due, self.model(images), strict=True):
                keep = out["scores"] >= self.params.min_score  # sorted by score already
                ids = out["labels"][keep][: self.params.max_objects].tolist()
                found[i] = [self.labels[k] for k in ids if 0 < k < len(self.labels)]
        return [Features("image", labels=found.get(i, []), vocabulary=DETECT) for i in range(len(items))]


def create(params: DetectParams, modality: Modality, device: str, dtype: str) -> DetectProcessor:
    # Detectors stay float32: their box heads lose accuracy in half precision.
    return DetectProcessor(params, device)
