"""Compile librosa's numba kernels once (install step); later processes load the cache."""

from __future__ import annotations

import time

import numpy as np


def main() -> None:
    started = time.monotonic()
    from processors.audio import loudness, mfcc, to_mono
    from processors.params import AudioParams

    rng = np.random.default_rng(0)
    stereo = rng.normal(0, 0.1, (2, 4410)).astype(np.float32)
    mono = to_mono(stereo, 44_100, 16_000, 10.0)
    mfcc(mono, 16_000)
    loudness(mono, 16_000, AudioParams())
    print(f"processors.warmup: librosa kernels ready in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
