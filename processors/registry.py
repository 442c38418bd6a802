"""Processors by name, so ``routing.toml`` can say ``processor = "cnn"``.

A :class:`ProcessorSpec` names its parameter model and a lazy factory path;
nothing heavy is imported until a route is actually built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from engine.contracts.errors import ConfigError
from engine.contracts.types import Modality, Processor
from processors import cap_opencv_pixels
from processors.params import AudioParams, ImageParams, PassthroughParams, TextParams

#: ``factory(params, modality, device, dtype) -> Processor``
Factory = Callable[[Any, Modality, str, str], Processor[Any]]


@dataclass(frozen=True, slots=True)
class ProcessorSpec:
    name: str
    #: The modality it serves, or ``None`` for any.
    modality: Modality | None
    params: type[BaseModel]
    #: ``"module:callable"``, imported on first use.
    factory: str
    doc: str = ""
    #: Called with the validated parameters before the factory's module is
    #: imported (what must happen before a library loads).
    before_import: Callable[[Any], None] | None = None

    def create(
        self, params: dict[str, Any], modality: Modality, device: str = "auto", dtype: str = "float32"
    ) -> Processor[Any]:
        module_name, _, attr = self.factory.partition(":")
        validated = self.params.model_validate(params)
        if self.before_import is not None:
            self.before_import(validated)
        make: Factory = getattr(importlib.import_module(module_name), attr)
        return make(validated, modality, device, dtype)


REGISTRY: dict[str, ProcessorSpec] = {}


def register(spec: ProcessorSpec) -> None:
    """Add a processor; third-party code may call this before building routes."""
    REGISTRY[spec.name] = spec


def lookup(name: str) -> ProcessorSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError([f"processor {name!r} is not registered (known: {known})"]) from None


def _cap_opencv(params: ImageParams) -> None:
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
