"""The ``cnn`` and ``minilm`` factories: each route on the runtime its params name.

Kept apart from the runtimes so that choosing ONNX never imports torch:
``runtime = "onnx"`` imports :mod:`processors.onnx_image` or
:mod:`processors.onnx_text` only, ``torch`` imports :mod:`processors.image`
or :mod:`processors.text`.
"""

from __future__ import annotations

import importlib

from engine.contracts.types import Modality, Processor
from processors.params import ImageParams, TextParams

_IMAGE = {"torch": "processors.image", "onnx": "processors.onnx_image"}
_TEXT = {"torch": "processors.text", "onnx": "processors.onnx_text"}


def _create(module: str, params: object, modality: Modality, device: str, dtype: str) -> Processor[object]:
    processor: Processor[object] = importlib.import_module(module).create(params, modality, device, dtype)
    return processor


def image(params: ImageParams, modality: Modality, device: str, dtype: str) -> Processor[object]:
    return _create(_IMAGE[params.runtime], params, modality, device, dtype)


def text(params: TextParams, modality: Modality, device: str, dtype: str) -> Processor[object]:
    return _create(_TEXT[params.runtime], params, modality, device, dtype)
