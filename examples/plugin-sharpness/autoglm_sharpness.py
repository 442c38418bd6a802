"""A processor plugin for Open-AutoGLM: how sharp each frame is.

The score is the variance of the Laplacian of the grey frame: edges make
large second derivatives, blur flattens them, so a sharp frame scores high
and a blurred or out-of-focus one low. ``blurry`` is 1.0 when the score is
under the route's ``threshold``. No model weights: the version the engine
reports is the hash of these parameters.

Installed, it declares the entry point ``sharpness`` in the group
``autoglm.processors`` (see pyproject.toml); a route then says::

    [[routes]]
    modality = "image"
    processor = "sharpness"
    params = { threshold = 100.0 }
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from engine.contracts.errors import EventRejected
from engine.contracts.plugins import API_VERSION, ProcessorSpec
from engine.contracts.types import Features, InputEvent, Modality

__version__ = "0.1.0"


class SharpnessParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Scores under it count as blurry.
    threshold: float = Field(100.0, ge=0)
    #: The longer side is scaled down to this before scoring (0: as sent), so
    #: scores of cameras with different resolutions compare.
    max_side: int = Field(640, ge=0)


class SharpnessProcessor:
    """prepare: decode to grey (cheap, per event); run: one score per frame."""

    modality: Modality = "image"
    model_name = "laplacian-variance"

    def __init__(self, params: SharpnessParams) -> None:
        import cv2  # imported when a route is built, not when the engine lists plugins

        self._cv2 = cv2
        self.params = params

    def prepare(self, event: InputEvent) -> np.ndarray:
        cv2 = self._cv2
        grey = cv2.imdecode(np.frombuffer(event.payload, np.uint8), cv2.IMREAD_GRAYSCALE)
        if grey is None:
            raise EventRejected("decode_error", "not an image OpenCV can decode")
        side = self.params.max_side
        if side and max(grey.shape) > side:
            scale = side / max(grey.shape)
            grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        return grey

    def run(self, items: Sequence[np.ndarray]) -> list[Features]:
        cv2 = self._cv2
        out = []
        for grey in items:
            score = float(cv2.Laplacian(grey, cv2.CV_64F).var())
            blurry = 1.0 if score < self.params.threshold else 0.0
            out.append(Features("image", stats={"sharpness": score, "blurry": blurry}))
        return out


def create(params: SharpnessParams, modality: Modality, device: str, dtype: str) -> SharpnessProcessor:
    return SharpnessProcessor(params)


spec = ProcessorSpec(
    "sharpness",
    "image",
    SharpnessParams,
    "autoglm_sharpness:create",
    "variance of the Laplacian per frame (OpenCV)",
    version=__version__,
    api=API_VERSION,
)
