"""Image features on ONNX Runtime: the CNN that ``autoglm export`` wrote, without torch.

The exported graph takes the batch as the frames come out of
:func:`processors.frames.to_input` (``(B, S, S, 3)`` uint8 RGB) and does the
ImageNet normalisation itself, so this side only stacks frames: no torch,
no per-pixel numpy work. Its outputs are ``embedding`` ``(B, D)`` and, when
the model has a classifier with labels, ``logits`` ``(B, C)``.

Beside ``model.onnx`` lies ``model.onnx.json`` (:func:`read_sidecar`): the
model's name, input size and labels, and the checks the export passed. The
model's version is the sha256 of the ``.onnx`` file itself (it is the
route's weight file), so an int8 copy and its fp32 original are told apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engine.contracts.errors import ConfigError
from engine.contracts.types import Modality
from processors.frames import Embedding, FrameProcessor, PreparedImage, top5
from processors.params import ImageParams

#: The graph's input and outputs, as ``autoglm export`` names them.
INPUT = "pixels"
EMBEDDING = "embedding"
LOGITS = "logits"


def sidecar_path(onnx_path: str | Path) -> Path:
    return Path(f"{onnx_path}.json")


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """The ``.json`` beside an exported model; a missing or unreadable one is
    a configuration error naming ``params.onnx_path``."""
    path = sidecar_path(onnx_path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            [
                f"params.onnx_path = {str(onnx_path)!r}: cannot read its sidecar {path} ({exc}); "
                "write both with `autoglm export`"
            ]
        ) from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
        raise ConfigError([f"params.onnx_path = {str(onnx_path)!r}: its sidecar {path} names no model"])
    return meta


def providers(device: str) -> list[str]:
    """CUDA when asked for (or ``auto``) and this onnxruntime build has it; CPU always last."""
    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
        raise ConfigError([f'device = "{device}": this onnxruntime build has no CUDAExecutionProvider'])
    wanted = ["CUDAExecutionProvider"] if device != "cpu" and "CUDAExecutionProvider" in available else []
    return [*wanted, "CPUExecutionProvider"]


def open_session(onnx_path: str | Path, device: str = "cpu") -> ort.InferenceSession:
    """An inference session, or a configuration error naming ``params.onnx_path``."""
    if not Path(onnx_path).is_file():
        raise ConfigError(
            [
                f"params.onnx_path = {str(onnx_path)!r}: no such file; write it with "
                "`autoglm export --route NAME --out DIR`"
            ]
        )
    options = ort.SessionOptions()
    # Its threads would spin-wait between batches, taking the cores the
    # route's decode threads (prepare_threads) need; torch's pool yields.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=providers(device))
    except ConfigError:
        raise
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ConfigError(
            [f"params.onnx_path = {str(onnx_path)!r}: ONNX Runtime cannot load it: {exc}"]
        ) from exc


class OnnxImageProcessor(FrameProcessor):
    """CNN embedding ``(D,)`` per frame plus descriptors; batched forward on ONNX Runtime."""

    def __init__(self, params: ImageParams, device: str = "auto") -> None:
        super().__init__(params)
        assert params.onnx_path is not None  # ImageParams refuses runtime = "onnx" without it
        meta = read_sidecar(params.onnx_path)
        self.session = open_session(params.onnx_path, device)
        names = {o.name for o in self.session.get_outputs()}
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] != [INPUT] or EMBEDDING not in names:
            raise ConfigError(
                [
                    f"params.onnx_path = {params.onnx_path!r}: not an `autoglm export` image model "
                    f"(inputs {[i.name for i in inputs]}, outputs {sorted(names)})"
                ]
            )
        size = inputs[0].shape[1]
        if isinstance(size, int) and size != params.input_size:
            raise ConfigError(
                [
                    f"params.input_size = {params.input_size}: the model at {params.onnx_path!r} "
                    f"takes {size} x {size} frames; set input_size = {size}"
                ]
            )
        self._outputs = [EMBEDDING, LOGITS] if LOGITS in names else [EMBEDDING]
        labels = meta.get("labels") or []
        self.labels = [str(x) for x in labels] if LOGITS in names else []
        self.model_name = str(meta["model"])
        self.weight_files = (str(params.onnx_path),)
        self.providers = self.session.get_providers()

    def embed(self, items: Sequence[PreparedImage]) -> tuple[Embedding, list[list[str]]]:
        batch = np.stack([it.pixels for it in items])  # (B, S, S, 3) uint8
        out = self.session.run(self._outputs, {INPUT: batch})
        emb = np.asarray(out[0], dtype=np.float32)
        top: list[list[str]] = [[] for _ in items]
        if self.labels:
            top = top5(np.asarray(out[1], dtype=np.float32), self.labels)
        return emb, top


def create(params: ImageParams, modality: Modality, device: str, dtype: str) -> OnnxImageProcessor:
    return OnnxImageProcessor(params, device)
