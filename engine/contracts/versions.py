"""A loaded model's version: the sha256 of what determines its outputs.

A processor says what it loaded through two optional attributes:
``model_name`` (``"mobilenet_v3_small"``; default: the processor's name) and
``weight_files`` (the files its weights came from). The version is the
sha256 over those files' bytes, in path order; a model with no weight file
(random weights from a seed, MFCCs) is versioned by its parameters instead,
since they alone decide its outputs. Either way ``sha256:`` and the first
:data:`DIGITS` hex digits: enough to tell models apart, short enough to be a
metric label.

Computed once per route build, never per event. A weight file is read once
per process for each (path, size, mtime): a reload that keeps the file does
not hash it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.contracts.errors import ConfigError
from engine.contracts.types import ModelVersion

#: Hex digits of the sha256 a version keeps.
DIGITS = 12
_CHUNK = 1 << 20

_file_digests: dict[tuple[str, int, int], bytes] = {}


def file_digest(path: str | os.PathLike[str]) -> bytes:
    """The sha256 of one file's bytes (cached while its size and mtime hold)."""
    p = Path(path).resolve()
    try:
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in _file_digests:
            h = hashlib.sha256()
            with p.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            _file_digests[key] = h.digest()
    except OSError as exc:
        raise ConfigError([f"weight file {str(path)!r}: cannot read it to version the model: {exc}"]) from exc
    return _file_digests[key]


def weights_version(files: Sequence[str | os.PathLike[str]]) -> str:
    """``sha256:<hex>`` over the files' own digests, in path order (so the same
    weights give the same version wherever they lie)."""
    h = hashlib.sha256()
    for path in sorted(files, key=lambda f: Path(f).name):
        h.update(file_digest(path))
    return f"sha256:{h.hexdigest()[:DIGITS]}"


def config_version(config: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the parameters as canonical JSON (for a model with no weight file)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:DIGITS]}"


def identify(
    processor_name: str, processor: object, params: Mapping[str, Any], variant: str = ""
) -> ModelVersion:
    """The :class:`ModelVersion` of a processor just built with ``params``."""
    model = getattr(processor, "model_name", None)
    files = getattr(processor, "weight_files", None) or ()
    if files:
        version = weights_version(list(files))
    else:
        version = config_version({"processor": processor_name, "params": dict(params)})
    name = model if isinstance(model, str) and model else processor_name
    return ModelVersion(processor_name, name, version, variant)
