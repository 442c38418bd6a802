"""How close an exported model is to torch: embedding cosine and top-1 agreement.

Used by ``autoglm export`` before it writes a file and by
``benchmarks/edge.py``. The sample frames are the user's (a directory of
JPEG/PNG files: their cameras' footage is what the model will see, and what
static int8 quantisation calibrates on) or, without one, generated scenes
(gradients and shapes; seeded): never pure noise, which no camera sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from engine.contracts.errors import ConfigError

if TYPE_CHECKING:
    from processors.params import ImageParams

Frames = npt.NDArray[np.uint8]
Floats = npt.NDArray[np.float32]
_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


@dataclass(frozen=True, slots=True)
class Fidelity:
    samples: int
    cosine_mean: float
    cosine_min: float
    #: Share of frames whose argmax class is torch's.
    top1: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "samples": self.samples,
            "cosine_mean": round(self.cosine_mean, 6),
            "cosine_min": round(self.cosine_min, 6),
            "top1_agreement": round(self.top1, 4),
        }


def generated_frames(n: int, size: int, seed: int = 0) -> Frames:
    """``(n, size, size, 3)`` uint8 scenes: a colour gradient, a few rectangles, mild noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        lo, hi = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 1)
        t = angle * ramp[None, :] + (1 - angle) * ramp[:, None]
        img = lo + (hi - lo) * t[..., None]
        for _ in range(rng.integers(1, 5)):
            y, x = rng.integers(0, size, 2)
            h, w = rng.integers(size // 8, size // 2, 2)
            img[y : y + h, x : x + w] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 6, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def frames_from(directory: Path, size: int, limit: int) -> Frames:
    """Up to ``limit`` frames of a directory's JPEG/PNG files, as the route prepares them."""
    from engine.contracts.types import ContentType
    from processors.decode import decode_image
    from processors.frames import to_input

    if not directory.is_dir():
        raise ConfigError([f"--calibrate {str(directory)!r}: not a directory"])
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in _SUFFIXES)[:limit]
    if not files:
        raise ConfigError([f"--calibrate {str(directory)!r}: no .jpg/.jpeg/.png file in it"])
    out = []
    for f in files:
        ct = ContentType(_SUFFIXES[f.suffix.lower()])
        out.append(to_input(decode_image(f.read_bytes(), ct, 1 << 30, size), size))
    return np.stack(out)


def sample_frames(directory: Path | None, params: ImageParams, limit: int) -> Frames:
    if directory is not None:
        return frames_from(directory, params.input_size, limit)
    return generated_frames(limit, params.input_size, params.seed)


def cosines(a: Floats, b: Floats) -> Floats:
    """Row-wise cosine similarity of two ``(B, D)`` arrays, in float64: a
    random-weight MobileNet's embeddings are ~1e-8, whose squared norms a
    fixed epsilon would swamp."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(axis=1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.asarray(num / np.maximum(den, np.finfo(np.float64).tiny), dtype=np.float32)


def measure(emb: Floats, logits: Floats, ref_emb: Floats, ref_logits: Floats) -> Fidelity:
    cos = cosines(emb, ref_emb)
    top1 = float((logits.argmax(axis=1) == ref_logits.argmax(axis=1)).mean())
    return Fidelity(len(cos), float(cos.mean()), float(cos.min()), top1)


def compare(onnx_path: Path, frames: Frames, ref_emb: Floats, ref_logits: Floats) -> Fidelity:
    """Run the ONNX file on ``frames`` (CPU, batches of 8) and measure it against torch's outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    embs, logits = [], []
    for i in range(0, len(frames), 8):
        e, lg = session.run(["embedding", "logits"], {"pixels": frames[i : i + 8]})
        embs.append(e)
        logits.append(lg)
    return measure(np.concatenate(embs), np.concatenate(logits), ref_emb, ref_logits)
