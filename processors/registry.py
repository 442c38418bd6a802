"""The built-in processors, declared as plugins like any other.

Each spec below is named by an entry point in the group
``autoglm.processors`` of our own ``pyproject.toml``
(``cnn = "processors.registry:cnn"``), so the engine finds them exactly as
it finds a third-party package's (:mod:`engine.contracts.plugins`). The
``ProcessorSpec`` / ``register`` / ``lookup`` / ``REGISTRY`` names stay
importable from here, where older plugins looked for them.
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

__all__ = [
    "REGISTRY",
    "Factory",
    "ProcessorSpec",
    "asr",
    "cnn",
    "detect",
    "lookup",
    "mfcc",
    "minilm",
    "ocr",
    "passthrough",
    "register",
    "vad",
]


def _cap_opencv(params: ImageParams | OCRParams | DetectParams) -> None:
    """OpenCV's own pixel cap follows the route's max_pixels (read once, when cv2 loads)."""
    cap_opencv_pixels(params.max_pixels)


cnn = ProcessorSpec(
    "cnn",
    "image",
    ImageParams,
    "processors.runtime:image",
    "torchvision CNN (torch or ONNX Runtime)",
    before_import=_cap_opencv,
)
mfcc = ProcessorSpec("mfcc", "audio", AudioParams, "processors.audio:create", "librosa MFCC")
minilm = ProcessorSpec(
    "minilm", "text", TextParams, "processors.runtime:text", "MiniLM encoder (torch or ONNX Runtime)"
)
passthrough = ProcessorSpec(
    "passthrough", None, PassthroughParams, "processors.passthrough:create", "byte count"
)
vad = ProcessorSpec("vad", "audio", VADParams, "processors.vad:create", "Silero VAD (ONNX)")
asr = ProcessorSpec("asr", "audio", ASRParams, "processors.asr:create", "speech to text")
ocr = ProcessorSpec("ocr", "image", OCRParams, "processors.ocr:create", "RapidOCR", before_import=_cap_opencv)
detect = ProcessorSpec(
    "detect", "image", DetectParams, "processors.detect:create", "COCO objects", before_import=_cap_opencv
)
