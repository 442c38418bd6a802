"""Device choice and batch transfer, under the name the processors import
(the helpers live in :mod:`engine.contracts.devices`, shared with the GLM)."""

from __future__ import annotations

from engine.contracts.devices import resolve_device, resolve_dtype, to_device

__all__ = ["resolve_device", "resolve_dtype", "to_device"]
