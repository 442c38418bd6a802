"""Open-AutoGLM: an event-driven multimodal ingestion engine on NATS.

``from engine import Producer, Results`` (events in, records out) and
``AutoGLM``, ``PromptTemplate``. They load on first use (PEP 562): the
engine's own modules import this package for ``__version__``, and loading
the producer here would close an import cycle through them (for the types,
import them from their packages: ``from engine.sources import Producer``)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AutoGLM", "Producer", "PromptTemplate", "Results"]
__version__ = "0.1.0"

_LAZY = {
    "AutoGLM": "engine.glm.client",
    "PromptTemplate": "engine.glm.prompts",
    "Producer": "engine.sources.producer",
    "Results": "engine.sources.results",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
