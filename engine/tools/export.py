"""``autoglm export``: the image route's CNN as an ONNX file (optionally int8), checked.

The exported graph is the route's torch model with the ImageNet
normalisation in front (:class:`_Exportable`): it takes the frames as
:func:`processors.frames.to_input` gives them, ``(B, S, S, 3)`` uint8 RGB,
and gives ``embedding`` and ``logits``, so the ONNX runtime needs no torch
(:mod:`processors.onnx_image`).

Correctness is checked, not assumed: each file is run by ONNX Runtime on
sample frames (the ``--calibrate`` directory's, else generated ones) and
compared with torch (:mod:`engine.tools.fidelity`); a file whose mean
embedding cosine is under the threshold is deleted, not written, and the
command fails. int8 is ONNX Runtime's quantisation: ``static`` (QDQ,
calibrated on the sample frames) or ``dynamic`` (weights only).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from engine.config.models import EngineConfig
from engine.contracts.errors import AutoGLMError, ConfigError
from engine.contracts.versions import config_version, weights_version
from engine.tools.fidelity import Fidelity, compare, sample_frames

if TYPE_CHECKING:
    from processors.params import ImageParams

Frames = npt.NDArray[np.uint8]
Quantisation = Literal["static", "dynamic"]
#: The opset the exporter writes (ONNX Runtime 1.2x runs it on every provider).
OPSET = 18


class ExportRefused(AutoGLMError):
    """The exported model is too far from torch's: nothing was written."""


@dataclass(frozen=True, slots=True)
class Exported:
    path: Path
    precision: str
    fidelity: Fidelity
    version: str


def image_params(config: EngineConfig, route: str) -> ImageParams:
    """The params of the first ``cnn`` route of modality ``route`` (``--route image``)."""
    from processors.params import ImageParams

    for i, r in enumerate(config.routes):
        if r.modality == route and r.processor == "cnn":
            params = ImageParams.model_validate(r.params)
            if params.runtime != "torch":
                raise ConfigError(
                    [
                        f'routes[{i}].params.runtime = "{params.runtime}": export the torch model '
                        '(runtime = "torch"), then point the route at the file'
                    ]
                )
            return params
    raise ConfigError([f'--route {route!r}: no route of that modality with processor = "cnn"'])


def _torch_model(params: ImageParams) -> Any:
    """The route's model with normalisation in front, in eval mode on the CPU."""
    import torch
    from torch import nn

    from processors.image import _MEAN, _STD, build_backbone

    class _Exportable(nn.Module):
        def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
            super().__init__()
            self.backbone, self.head = backbone, head
            self.mean: torch.Tensor
            self.std: torch.Tensor
            self.register_buffer("mean", torch.from_numpy(_MEAN * 255).view(1, 3, 1, 1))
            self.register_buffer("std", torch.from_numpy(_STD * 255).view(1, 3, 1, 1))

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std
            emb = self.backbone(x)
            return emb, self.head(emb)

    backbone, head, labels = build_backbone(params)
    return _Exportable(backbone, head).eval(), labels


def _torch_outputs(model: Any, frames: Frames) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    import torch

    with torch.inference_mode():
        emb, logits = model(torch.from_numpy(frames))
    return emb.numpy(), logits.numpy()


def _export_fp32(model: Any, frames: Frames, path: Path) -> None:
    import torch

    example = torch.from_numpy(frames[:2])
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["pixels"],
        output_names=["embedding", "logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        opset_version=OPSET,
        dynamo=True,
        external_data=False,  # one file: what the route points at, and what is hashed
        verbose=False,
    )


def _quantise(src: Path, dst: Path, how: Quantisation, frames: Frames) -> None:
    """int8 copy of ``src``. Static: shape inference and graph fusions first
    (ONNX Runtime's pre-processing), then per-channel QOperator kernels,
    calibrated on ``frames``: the fastest of the layouts measured on
    MobileNetV3 (benchmarks/RESULTS.md, "Edge")."""
    import contextlib
    import io
    import logging

    from onnxruntime import quantization as q

    if how == "dynamic":
        q.quantize_dynamic(str(src), str(dst), weight_type=q.QuantType.QInt8)
        return

    class _Reader(q.CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter([{"pixels": frames[i : i + 8]} for i in range(0, len(frames), 8)])

        def get_next(self) -> dict[str, Frames] | None:
            return next(self._batches, None)

    prepared = dst.with_name(dst.name + ".pre")
    # It warns, on the root logger, of every int64 shape tensor it rightly leaves alone.
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every inferred shape
            q.quant_pre_process(str(src), str(prepared))
        q.quantize_static(
            str(prepared),
            str(dst),
            _Reader(),
            quant_format=q.QuantFormat.QOperator,
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
        )
    finally:
        logging.disable(logging.NOTSET)
        prepared.unlink(missing_ok=True)


def _identity(params: ImageParams) -> str:
    """The torch model's version, as the engine would report it."""
    from processors.image import weights_file

    path = weights_file(params)
    if path is not None:
        return weights_version([path])
    return config_version({"processor": "cnn", "params": params.model_dump(mode="json")})


def keep_checked(tmp: Path, final: Path, meta: dict[str, Any]) -> str:
    """Move a checked file into place and write its sidecar; returns its version."""
    os.replace(tmp, final)
    version = weights_version([final])
    Path(f"{final}.json").write_text(json.dumps({**meta, "version": version}, indent=2) + "\n")
    return version


def export_image(
    params: ImageParams,
    out: Path,
    *,
    int8: Quantisation | None = None,
    calibrate: Path | None = None,
    min_cosine: float = 0.99,
    min_cosine_int8: float = 0.97,
    samples: int = 32,
) -> list[Exported]:
    """Write ``<model>.onnx`` (and ``<model>.int8.onnx``) under ``out``, each only
    when it agrees with torch; :class:`ExportRefused` names the one that did not."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    frames = sample_frames(calibrate, params, samples)
    model, labels = _torch_model(params)
    ref_emb, ref_logits = _torch_outputs(model, frames)
    base = {
        "format": 1,
        "model": params.model,
        "input_size": params.input_size,
        "labels": labels,
        "source": {"model": params.model, "weights": params.weights, "version": _identity(params)},
        "exporter": {"torch": torch.__version__, "opset": OPSET},
    }
    done: list[Exported] = []
    steps: list[tuple[str, Quantisation | None, float]] = [("fp32", None, min_cosine)]
    if int8 is not None:
        steps.append((f"int8-{int8}", int8, min_cosine_int8))
    fp32_tmp = out / f".{params.model}.onnx.tmp"
    try:
        _export_fp32(model, frames, fp32_tmp)
        for precision, how, threshold in steps:
            name = params.model if how is None else f"{params.model}.int8"
            tmp = fp32_tmp if how is None else out / f".{name}.onnx.tmp"
            if how is not None:
                _quantise(out / f"{params.model}.onnx", tmp, how, frames)
            fid = compare(tmp, frames, ref_emb, ref_logits)
            if fid.cosine_mean < threshold:
                tmp.unlink(missing_ok=True)
                raise ExportRefused(
                    f"{name}.onnx ({precision}): mean embedding cosine to torch {fid.cosine_mean:.4f} "
                    f"< {threshold} on {fid.samples} frames (min {fid.cosine_min:.4f}); not written"
                )
            meta = {**base, "model": name, "precision": precision, "checks": fid.as_dict()}
            final = out / f"{name}.onnx"
            done.append(Exported(final, precision, fid, keep_checked(tmp, final, meta)))
    finally:
        for leftover in out.glob(f".{params.model}*.onnx.tmp*"):
            leftover.unlink(missing_ok=True)
    return done
