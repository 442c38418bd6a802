"""The ``cnn`` processor's factory: the image route on the runtime its params name.

Kept apart from both runtimes so that choosing ONNX never imports torch:
``runtime = "onnx"`` imports :mod:`processors.onnx_image` only, ``torch``
imports :mod:`processors.image`.
"""

from __future__ import annotations

import importlib

from engine.contracts.types import Modality, Processor
from processors.params import ImageParams

_MODULES = {"torch": "processors.image", "onnx": "processors.onnx_image"}


def create(params: ImageParams, modality: Modality, device: str, dtype: str) -> Processor[object]:
    make = importlib.import_module(_MODULES[params.runtime]).create
    processor: Processor[object] = make(params, modality, device, dtype)
    return processor
