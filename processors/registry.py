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

from engine.errors import ConfigError
from engine.types import Modality, Processor
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

    def create(
        self, params: dict[str, Any], modality: Modality, device: str = "auto", dtype: str = "float32"
    ) -> Processor[Any]:
        module_name, _, attr = self.factory.partition(":")
        make: Factory = getattr(importlib.import_module(module_name), attr)
        return make(self.params.model_validate(params), modality, device, dtype)


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


register(ProcessorSpec("cnn", "image", ImageParams, "processors.image:create", "torchvision CNN"))
register(ProcessorSpec("mfcc", "audio", AudioParams, "processors.audio:create", "librosa MFCC"))
register(ProcessorSpec("minilm", "text", TextParams, "processors.text:create", "MiniLM encoder"))
register(ProcessorSpec("passthrough", None, PassthroughParams, "processors.passthrough:create", "byte count"))
