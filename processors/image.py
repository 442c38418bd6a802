"""Image features on torch: a torchvision CNN embedding of each batch.

Decoding and the descriptors live in :mod:`processors.decode` and
:mod:`processors.frames` (torch-free, shared with the ONNX runtime); their
names stay importable from here. :class:`ImageProcessor` builds the model
and runs its batched forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from engine.contracts.errors import ConfigError
from engine.contracts.types import Modality
from processors.decode import OPENCV_MAX_PIXELS, U8Image, decode_image, image_size, jpeg_size
from processors.devices import resolve_device, resolve_dtype, to_device
from processors.frames import Embedding, FrameProcessor, PreparedImage, descriptors, motion, to_input
from processors.params import ImageParams

__all__ = [
    "OPENCV_MAX_PIXELS",
    "Embedding",
    "ImageProcessor",
    "PreparedImage",
    "U8Image",
    "build_backbone",
    "create",
    "decode_image",
    "descriptors",
    "image_size",
    "jpeg_size",
    "motion",
    "normalise",
    "to_input",
    "weights_file",
]

_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalise(batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, S, S, 3)`` uint8 RGB -> ``(B, 3, S, S)`` ImageNet-normalised ``dtype``.

    Runs on the model's device, so on CUDA the copy is uint8 (4x smaller).
    """
    mean = torch.as_tensor(_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.as_tensor(_STD, device=batch.device).view(1, 3, 1, 1)
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    return ((x - mean) / std).to(dtype)


def weights_file(params: ImageParams) -> Path | None:
    """Where ``weights = "imagenet"`` loads from (``None``: random weights, no file)."""
    if params.weights != "imagenet":
        return None
    if params.weights_path:
        return Path(params.weights_path)
    weights = getattr(torchvision.models, _WEIGHTS[params.model]).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


_WEIGHTS = {
    "mobilenet_v3_small": "MobileNet_V3_Small_Weights",
    "resnet18": "ResNet18_Weights",
    "resnet50": "ResNet50_Weights",
    "efficientnet_b0": "EfficientNet_B0_Weights",
}


def build_backbone(params: ImageParams) -> tuple[nn.Module, nn.Module, list[str]]:
    """(embedding model, classifier head, labels). Labels only with ImageNet weights."""
    builders = {
        "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, "MobileNet_V3_Small_Weights"),
        "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
        "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
        "efficientnet_b0": (torchvision.models.efficientnet_b0, "EfficientNet_B0_Weights"),
    }
    make, weights_enum = builders[params.model]
    torch.manual_seed(params.seed)
    model = make(weights=None)
    labels: list[str] = []
    if params.weights == "imagenet":
        weights = getattr(torchvision.models, weights_enum).DEFAULT
        if params.weights_path:
            path = Path(params.weights_path)
        else:
            path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not path.is_file():
            raise ConfigError(
                [
                    f'params.weights = "imagenet": no weights file at {path}; put the torchvision '
                    f"checkpoint {Path(weights.url).name} there, set params.weights_path, "
                    'or use weights = "random"'
                ]
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (RuntimeError, OSError, ValueError) as exc:
            raise ConfigError([f"params.weights_path = {str(path)!r}: cannot load: {exc}"]) from exc
        labels = list(weights.meta["categories"])
    head: nn.Module
    if hasattr(model, "fc"):
        head, model.fc = model.fc, nn.Identity()
    else:
        head, model.classifier = model.classifier, nn.Identity()
    return model.eval(), head.eval(), labels


class ImageProcessor(FrameProcessor):
    """CNN embedding ``(D,)`` per frame plus descriptors; batched forward on torch."""

    def __init__(self, params: ImageParams, device: str = "auto", dtype: str = "float32") -> None:
        super().__init__(params)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        model, head, labels = build_backbone(params)
        self.model = model.to(self.device, self.dtype)
        self.head = head.to(self.device, self.dtype)
        self.labels = labels
        path = weights_file(params)
        self.weight_files = (str(path),) if path is not None else ()

    @torch.inference_mode()
    def embed(self, items: Sequence[PreparedImage]) -> tuple[Embedding, list[list[str]]]:
        """``B`` prepared frames -> ``(B, D)`` embeddings and each frame's top-5 labels."""
        batch = torch.from_numpy(np.stack([it.pixels for it in items]))  # (B, S, S, 3) uint8
        emb = self.model(normalise(to_device(batch, self.device), self.dtype))  # (B, D)
        top: list[list[str]] = [[] for _ in items]
        if self.labels:
            idx = self.head(emb).topk(5, dim=1).indices.cpu().tolist()  # (B, 5)
            top = [[self.labels[i] for i in row] for row in idx]
        return emb.float().cpu().numpy(), top


def create(params: ImageParams, modality: Modality, device: str, dtype: str) -> ImageProcessor:
    return ImageProcessor(params, device, dtype)
