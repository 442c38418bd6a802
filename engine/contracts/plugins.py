"""What a processor plugin declares, and where the declarations are kept.

A :class:`ProcessorSpec` names its parameter model and a lazy factory path;
nothing heavy is imported until a route is actually built. Plugins add
theirs with :func:`register` (``processors.registry`` does it for the
built-in ones, and re-exports this API under its own name).

The engine never imports a plugin by module: :data:`PLUGINS` lists the
modules that register processors, imported by name the first time the
registry is read, as entry points would be. So checking ``routing.toml``
(``engine.config``) and building routes (``engine.runtime.build``) see the
built-in processors, while ``processors`` stays above the engine and may
import ``engine.contracts`` without a cycle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from engine.contracts.errors import ConfigError
from engine.contracts.types import Modality, Processor

#: ``factory(params, modality, device, dtype) -> Processor``
Factory = Callable[[Any, Modality, str, str], Processor[Any]]

#: Modules imported (once) before the registry is first read; each registers its processors.
PLUGINS: list[str] = ["processors.registry"]


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
_loaded: set[str] = set()


def register(spec: ProcessorSpec) -> None:
    """Add a processor; third-party code may call this before building routes."""
    REGISTRY[spec.name] = spec


def registered() -> Mapping[str, ProcessorSpec]:
    """Every processor, the :data:`PLUGINS` loaded first."""
    for module in PLUGINS:
        if module not in _loaded:
            _loaded.add(module)  # first, so a plugin reading the registry as it loads does not recurse
            importlib.import_module(module)
    return REGISTRY


def lookup(name: str) -> ProcessorSpec:
    known = registered()
    try:
        return known[name]
    except KeyError:
        raise ConfigError(
            [f"processor {name!r} is not registered (known: {', '.join(sorted(known))})"]
        ) from None
