"""Device choice and batch transfer shared by the torch processors and the GLM.

``device = "auto" | "cpu" | "cuda[:N]"`` means the same in a route and in
``[glm]``; the engine reads it here, so it never imports ``processors``.
"""

from __future__ import annotations

import torch

from engine.contracts.errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """``auto`` takes CUDA when torch sees it; ``cuda:N`` must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError([f'device = "{spec}": torch sees no CUDA device here'])
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError([f'device = "{spec}": only {torch.cuda.device_count()} CUDA device(s) here'])
    return device


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """Half precision only where it pays (CUDA); CPU models stay float32."""
    return _DTYPES[spec] if device.type == "cuda" else torch.float32


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU batch; on CUDA via pinned memory so the copy can overlap."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch
