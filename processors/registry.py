"""Processors by name, so ``routing.toml`` can say ``processor = "cnn"``.

The registry itself is :mod:`engine.contracts.plugins` (the engine reads it
without importing ``processors``); this module registers the built-in
processors there when imported and keeps the ``ProcessorSpec`` /
``register`` / ``lookup`` / ``REGISTRY`` names where plugins look for them.
"""

from __future__ import annotations

from engine.contracts.plugins import REGISTRY, Factory, ProcessorSpec, lookup, register
from processors import cap_opencv_pixels
from processors.params import (
    ASRParams,
    AudioParams,
    DetectParams,
    ImageParams,
    OCRParams,
    PassthroughParams,
    TextParams,
    VADParams,
)

__all__ = ["REGISTRY", "Factory", "ProcessorSpec", "lookup", "register"]


def _cap_opencv(params: ImageParams | OCRParams | DetectParams) -> None:
    """OpenCV's own pixel cap follows the route's max_pixels (read once, when cv2 loads)."""
    cap_opencv_pixels(params.max_pixels)


register(
    ProcessorSpec(
        "cnn", "image", ImageParams, "processors.image:create", "torchvision CNN", before_import=_cap_opencv
    )
)
register(ProcessorSpec("mfcc", "audio", AudioParams, "processors.audio:create", "librosa MFCC"))
register(ProcessorSpec("minilm", "text", TextParams, "processors.text:create", "MiniLM encoder"))
register(ProcessorSpec("passthrough", None, PassthroughParams, "processors.passthrough:create", "byte count"))
register(ProcessorSpec("vad", "audio", VADParams, "processors.vad:create", "Silero VAD (ONNX)"))
register(ProcessorSpec("asr", "audio", ASRParams, "processors.asr:create", "speech to text"))
register(
    ProcessorSpec("ocr", "image", OCRParams, "processors.ocr:create", "RapidOCR", before_import=_cap_opencv)
)
register(
    ProcessorSpec(
        "detect", "image", DetectParams, "processors.detect:create", "COCO objects", before_import=_cap_opencv
    )
)
