"""Processor throughput: each processor at batch sizes 1, 8, 32, plus the
ratios the processors issue asks for, each against a baseline measured in the
same run on the same machine.

    .venv/bin/python benchmarks/processors.py [--device cpu|cuda] [--quick]

Prints items/s and p50/p99 per-item latency (an item waits for its whole
batch, so its latency is its batch's time) and the ratios:
  mfcc   batched torch MFCC vs a per-chunk librosa.feature.mfcc loop
  image  640x480 JPEG decode + CNN, micro-batched vs batch size 1
  text   batched MiniLM vs one sentence at a time
and, for the processors that give the GLM words (``--only words``):
  vad    Silero VAD chunks/s (100 ms chunks)
  asr    pocketsphinx real-time factor: seconds of audio per second of CPU
  ocr    RapidOCR frames/s at 640x480, every frame read
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2
import librosa
import numpy as np
import torch

from engine.contracts.subjects import Subjects
from engine.contracts.types import InputEvent
from engine.wire.codec import decode_event, encode_headers

TS = 1_764_000_000_000_000_000


def timed_batches(
    fn: Callable[[Sequence[Any]], object], items: Sequence[Any], batch: int
) -> dict[str, float]:
    """Run ``fn`` over ``items`` in batches; items/s and per-item p50/p99 (ms)."""
    fn(items[:batch])  # warm-up: allocator, kernels, caches
    per_item: list[float] = []
    start = time.perf_counter()
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        t0 = time.perf_counter()
        fn(chunk)
        took = (time.perf_counter() - t0) * 1000
        per_item += [took] * len(chunk)
    total = time.perf_counter() - start
    q = statistics.quantiles(per_item, n=100) if len(per_item) > 1 else [per_item[0]] * 99
    return {"items_s": len(items) / total, "p50_ms": q[49], "p99_ms": q[98]}


def row(name: str, batch: int | str, r: dict[str, float]) -> None:
    print(
        f"  {name:<28} batch {batch!s:>5}  {r['items_s']:9.1f} items/s  "
        f"p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms"
    )


def events(modality: str, bodies: Sequence[bytes], ct: str) -> list[InputEvent]:
    return [
        decode_event(
            Subjects().input(f"cam{i % 4}", modality),  # type: ignore[arg-type]
            encode_headers(TS + i * 40_000_000, ct),
            b,
        )
        for i, b in enumerate(bodies)
    ]


def route_fn(
    modality: str, processor: str, device: str, **cfg: Any
) -> Callable[[Sequence[InputEvent]], object]:
    """The engine's own batch path: Route.process (parallel prepare, then one run)."""
    from engine.config.models import RouteConfig
    from engine.runtime.build import build_route

    rc = RouteConfig(modality=modality, processor=processor, device=device, **cfg)  # type: ignore[arg-type]
    route = build_route(rc, "bench")
    return lambda evs: route.process(list(evs))


def bench_mfcc(device: str, n: int) -> float:
    from processors.audio import TorchMFCC

    print(f"\nMFCC: {n} one-second 16 kHz chunks")
    rng = np.random.default_rng(0)
    t = np.arange(16_000) / 16_000
    chunks = [
        (0.3 * np.sin(2 * np.pi * (100 + i % 400) * t) + rng.normal(0, 0.02, t.size)).astype(np.float32)
        for i in range(n)
    ]
    base = timed_batches(
        lambda xs: [
            librosa.feature.mfcc(y=x, sr=16_000, n_mfcc=13, n_fft=512, hop_length=160, n_mels=40) for x in xs
        ],
        chunks,
        1,
    )
    row("librosa.feature.mfcc loop", 1, base)
    dev = torch.device(device)
    module = TorchMFCC(16_000, 13, 512, 160, 40).to(dev)

    def torch_batch(xs: Sequence[np.ndarray]) -> object:
        with torch.inference_mode():
            out = module(torch.from_numpy(np.stack(xs)).to(dev))
            return out[0].cpu()

    best = 0.0
    for b in (1, 8, 32, 256):
        r = timed_batches(torch_batch, chunks, b)
        row(f"TorchMFCC on {device}", b, r)
        best = max(best, r["items_s"])
    ratio = best / base["items_s"]
    print(
        f"  => batched torch / librosa loop = {ratio:.1f}x (best batch; torch also computes RMS and centroid)"
    )
    pcm = [(c * 32767).astype("<i2").tobytes() for c in chunks[:256]]
    fn = route_fn("audio", "mfcc", device)
    evs = events("audio", pcm, "audio/pcm;rate=16000;channels=1;format=s16le")
    for b in (1, 8, 32):
        row("mfcc route (decode+all)", b, timed_batches(fn, evs, b))
    return ratio


def bench_image(device: str, n: int) -> float:
    print(
        f"\nImage: {n} 640x480 JPEGs, decode + descriptors + mobilenet_v3_small, "
        f"prepare on {os.cpu_count()} threads"
    )
    rng = np.random.default_rng(1)
    bodies = []
    for i in range(n):
        img = rng.integers(0, 60, (480, 640, 3), dtype=np.uint8)
        cv2.circle(img, (100 + (i * 7) % 440, 240), 60, (40, 200, 220), -1)
        cv2.rectangle(img, (300, 50 + (i * 5) % 300), (420, 160 + (i * 5) % 300), (200, 60, 30), -1)
        bodies.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
    evs = events("image", bodies, "image/jpeg")
    results = {}
    threads = os.cpu_count() or 1
    for faces in (False, True):
        fn = route_fn("image", "cnn", device, params={"faces": faces}, prepare_threads=threads)
        for b in (1, 8, 32):
            r = timed_batches(fn, evs, b)
            row(f"cnn route faces={faces}", b, r)
            results[(faces, b)] = r["items_s"]
    ratio = max(results[(False, 8)], results[(False, 32)]) / results[(False, 1)]
    print(
        f"  => micro-batched / batch 1 = {ratio:.2f}x (faces off); with faces on "
        f"{max(results[(True, 8)], results[(True, 32)]) / results[(True, 1)]:.2f}x"
    )
    best = max(results[(True, 8)], results[(True, 32)])
    plain = max(results[(False, 8)], results[(False, 32)])
    print(
        f"  => one {os.cpu_count()}-core machine: {best:.0f} frames/s with faces = {best / 30:.1f} cameras "
        f"at 30 fps ({plain / 30:.1f} without face detection), image route alone"
    )
    return ratio


def bench_text(device: str, n: int) -> float:
    print(f"\nText: {n} captions, MiniLM")
    words = "a person walks past the red car while the dog barks at a passing bicycle near the station"
    vocab = words.split(" ")
    rng = np.random.default_rng(2)
    bodies = [" ".join(rng.choice(vocab, size=int(rng.integers(5, 25)))).encode() for _ in range(n)]
    evs = events("text", bodies, "text/plain")
    fn = route_fn("text", "minilm", device)
    res = {b: timed_batches(fn, evs, b) for b in (1, 8, 32)}
    for b, r in res.items():
        row("minilm route", b, r)
    ratio = max(res[8]["items_s"], res[32]["items_s"]) / res[1]["items_s"]
    print(f"  => batched / one at a time = {ratio:.2f}x")
    return ratio


def speech_chunks(repeat: int) -> tuple[list[bytes], float]:
    """tests/data/speech.wav ``repeat`` times as 100 ms s16le chunks, and its seconds."""
    import soundfile

    clip, _rate = soundfile.read(
        Path(__file__).resolve().parent.parent / "tests/data/speech.wav", dtype="int16"
    )
    audio = np.tile(np.asarray(clip), repeat)
    n = len(audio) // 1600
    return [audio[i * 1600 : (i + 1) * 1600].tobytes() for i in range(n)], n / 10


def audio_stream(bodies: Sequence[bytes]) -> list[InputEvent]:
    """One source's chunks, 100 ms apart (VAD and ASR keep per-source state)."""
    ct = "audio/pcm;rate=16000;channels=1;format=s16le"
    subject = Subjects().input("mic0", "audio")
    return [decode_event(subject, encode_headers(TS + i * 100_000_000, ct), b) for i, b in enumerate(bodies)]


def bench_words(device: str, k: int) -> None:
    """vad chunks/s, asr real-time factor, ocr frames/s; and what one box carries with them on."""
    print(f"\nWords: vad, asr (pocketsphinx), ocr (RapidOCR) on {os.cpu_count()} cores")
    bodies, seconds = speech_chunks(max(1, 8 // k))
    evs = audio_stream(bodies)
    vad = timed_batches(route_fn("audio", "vad", device), evs, 32)
    row("vad route (Silero ONNX)", 32, vad)
    asr = route_fn("audio", "asr", device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(0, len(evs), 8):
        asr(evs[i : i + 8])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rtf = seconds / cpu
    print(f"  asr route (pocketsphinx)      {seconds:.0f} s of speech in {cpu:.1f} s CPU ({wall:.1f} s wall)")
    print(f"  => asr real-time factor {rtf:.1f} s of audio per s of CPU (VAD and segmenting included)")
    frames = []
    for i in range(max(8, 32 // k)):
        img = np.full((480, 640, 3), 50, np.uint8)
        cv2.putText(img, f"EXIT {i}", (40, 160), cv2.FONT_HERSHEY_SIMPLEX, 2.5, (255, 255, 255), 5)
        cv2.putText(img, "GATE B", (40, 330), cv2.FONT_HERSHEY_SIMPLEX, 2.0, (0, 255, 255), 4)
        frames.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
    subject = Subjects().input("cam0", "image")
    img_evs = [  # a second apart: at ocr_fps = 1 every frame is read
        decode_event(subject, encode_headers(TS + i * 1_000_000_000, "image/jpeg"), b)
        for i, b in enumerate(frames)
    ]
    ocr = timed_batches(route_fn("image", "ocr", device, params={"ocr_fps": 1}), img_evs, 1)
    row("ocr route 640x480 (RapidOCR)", 1, ocr)
    cores = os.cpu_count() or 1
    mic_cpu = 1 / rtf + 10 / vad["items_s"]  # CPU seconds per second of one microphone, words only
    cam_cpu = 1 / ocr["items_s"]  # one frame read per second per camera
    print(
        f"  => one {cores}-core box, the words alone: {cores / mic_cpu:.0f} microphones (vad + asr) "
        f"or {cores / cam_cpu:.0f} cameras (ocr at 1 fps); each microphone costs {100 * mic_cpu:.0f} % "
        f"of a core, each camera's OCR {100 * cam_cpu:.0f} %"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer items (a smoke run)")
    ap.add_argument("--only", choices=["mfcc", "image", "text", "words"])
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "none"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device {args.device}, GPU {gpu}"
    )
    k = 4 if args.quick else 1
    ratios = {}
    if args.only in (None, "mfcc"):
        ratios["mfcc"] = bench_mfcc(args.device, 1000 // k)
    if args.only in (None, "image"):
        ratios["image"] = bench_image(args.device, 256 // k)
    if args.only in (None, "text"):
        ratios["text"] = bench_text(args.device, 512 // k)
    if args.only in (None, "words"):
        bench_words(args.device, k)
    targets = {"mfcc": 50.0 if args.device.startswith("cuda") else 3.0, "image": 2.0, "text": 2.5}
    print("\nsummary")
    for name, r in ratios.items():
        verdict = "meets" if r >= targets[name] else "MISSES"
        print(f"  {name:<6} {r:6.2f}x  target {targets[name]:g}x  {verdict}")


if __name__ == "__main__":
    main()
