"""What a processor plugin declares, and how the engine finds the plugins.

A plugin is an ordinary Python package that declares an entry point in the
group :data:`GROUP`::

    [project.entry-points."autoglm.processors"]
    sharpness = "autoglm_sharpness:spec"

The object the entry point names is a :class:`ProcessorSpec` (or a callable
with no arguments returning one). The spec names its parameter model and a
lazy factory path, so nothing heavy is imported until a route is built; it
says which version of this contract (:data:`API_VERSION`) it was written
for. The built-in processors are declared the same way, in our own
``pyproject.toml``.

Discovery happens the first time the registry is read and again on every
hot reload (:func:`discover`), so a package installed while the engine runs
is found by the next reload. A plugin that cannot be used (it targets
another contract version, two packages claim one name, loading it raises)
is *refused*: left out of the registry, with a message naming the package,
the entry point and the reason (:data:`REFUSED`). A route naming a refused
plugin is a configuration error (the engine refuses to start, or the reload
is refused); otherwise the engine logs the refusal and runs with the rest.

:func:`register` still adds a spec by hand (tests, embedding the engine).
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from engine.contracts.errors import ConfigError
from engine.contracts.types import Modality, Processor

log = logging.getLogger("autoglm.plugins")

#: The entry-point group processors are declared in.
GROUP = "autoglm.processors"
#: The version of this contract (the Processor protocol, the factory signature
#: and :class:`ProcessorSpec`). A plugin declaring another one is refused.
API_VERSION = 1

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
    #: The plugin's own version; empty: its package's.
    version: str = ""
    #: The contract version the plugin was written for.
    api: int = API_VERSION

    def create(
        self, params: dict[str, Any], modality: Modality, device: str = "auto", dtype: str = "float32"
    ) -> Processor[Any]:
        module_name, _, attr = self.factory.partition(":")
        validated = self.params.model_validate(params)
        if self.before_import is not None:
            self.before_import(validated)
        make: Factory = getattr(importlib.import_module(module_name), attr)
        return make(validated, modality, device, dtype)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a registered processor came from, for ``autoglm plugins``."""

    package: str
    version: str
    #: ``entry point NAME = VALUE`` or ``register()``.
    source: str


REGISTRY: dict[str, ProcessorSpec] = {}
#: How each processor in :data:`REGISTRY` got there (absent: put in by hand).
ORIGINS: dict[str, Origin] = {}
#: Plugins refused at the last discovery, by the name they claimed: why.
REFUSED: dict[str, str] = {}
#: Said after "unknown processor" when the built-ins themselves were not found:
#: the installed metadata predates the entry points (an old editable install).
BUILTINS_MISSING = (
    "; the built-in processors are not among them: this environment's open-autoglm metadata "
    "declares no autoglm.processors entry points (installed before they existed): run "
    "`make install` or `pip install -e .` again"
)
#: Names the last discovery registered, so the next one replaces only those.
_discovered: set[str] = set()
_ran = False


def register(spec: ProcessorSpec) -> None:
    """Add a processor by hand (not through an entry point)."""
    REGISTRY[spec.name] = spec
    ORIGINS[spec.name] = Origin("", spec.version, "register()")


def _spec_of(ep: metadata.EntryPoint) -> ProcessorSpec:
    """Load one entry point; :class:`ValueError` says why it is not a usable spec."""
    try:
        obj = ep.load()
        spec = obj if isinstance(obj, ProcessorSpec) else obj() if callable(obj) else obj
    except Exception as exc:  # a plugin's own bug: refused, never the engine's crash
        raise ValueError(f"loading it raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(spec, ProcessorSpec):
        raise ValueError(f"it gave a {type(spec).__name__}, not an engine.contracts.plugins.ProcessorSpec")
    if spec.api != API_VERSION:
        raise ValueError(f"it targets plugin API version {spec.api}; this engine speaks {API_VERSION}")
    if spec.name != ep.name:
        raise ValueError(f"its spec is named {spec.name!r}, not {ep.name!r} as the entry point says")
    return spec


def _package(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    return (dist.name, dist.version) if dist is not None else ("?", "")


def discover() -> Mapping[str, str]:
    """(Re)read every entry point of :data:`GROUP`: register the good ones, refuse
    the rest; returns :data:`REFUSED`. Each refusal is logged once per discovery."""
    global _ran
    _ran = True
    importlib.invalidate_caches()  # a package installed since the last look
    claims: dict[str, list[metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=GROUP):
        # The same distribution seen twice on sys.path (a checkout and its install) is one claim.
        seen = claims.setdefault(ep.name, [])
        if all(_package(e)[0] != _package(ep)[0] for e in seen):
            seen.append(ep)
    found: dict[str, tuple[ProcessorSpec, Origin]] = {}
    refused: dict[str, str] = {}
    for name, eps in claims.items():
        where = "; ".join(f"package {_package(e)[0]} entry point {e.name} = {e.value}" for e in eps)
        if len(eps) > 1:
            refused[name] = f"{where}: refused: {len(eps)} packages claim the processor name {name!r}"
            continue
        ep = eps[0]
        package, version = _package(ep)
        try:
            spec = _spec_of(ep)
        except ValueError as exc:
            refused[name] = f"{where}: refused: {exc}"
            continue
        found[name] = (spec, Origin(package, spec.version or version, f"entry point {ep.name} = {ep.value}"))
    for name in _discovered - found.keys():
        REGISTRY.pop(name, None)
        ORIGINS.pop(name, None)
    for name, (spec, origin) in found.items():
        REGISTRY[name] = spec
        ORIGINS[name] = origin
    _discovered.clear()
    _discovered.update(found)
    REFUSED.clear()
    REFUSED.update(refused)
    for message in refused.values():
        log.warning("processor plugin %s", message)
    return REFUSED


def registered() -> Mapping[str, ProcessorSpec]:
    """Every processor; the entry points are read the first time."""
    if not _ran:
        discover()
    return REGISTRY


def hint() -> str:
    """What to add to an "unknown processor" message: why the built-ins are missing, if they are."""
    return "" if "passthrough" in REGISTRY else BUILTINS_MISSING


def origin_of(name: str) -> Origin:
    return ORIGINS.get(name, Origin("", "", "register()"))


def lookup(name: str) -> ProcessorSpec:
    known = registered()
    try:
        return known[name]
    except KeyError:
        if name in REFUSED:
            raise ConfigError([f"processor {name!r}: {REFUSED[name]}"]) from None
        raise ConfigError(
            [f"processor {name!r} is not registered (known: {', '.join(sorted(known))}){hint()}"]
        ) from None
