"""Edge runtimes of the image CNN: torch fp32 vs ONNX Runtime fp32 vs ONNX int8.

    .venv/bin/python benchmarks/edge.py [--model mobilenet_v3_small|resnet18|minilm] [--seconds 5]

Exports the route's model (random weights, as in tests: no download) with
``autoglm export``'s own code into a temporary directory, then times each
runtime's ``embed`` (the route's batched forward, as the engine calls it:
the same prepared 224 x 224 frames, normalisation included) at batch 1 and
32 on the CPU, with torch and ONNX Runtime on the same number of threads.
Prints items/s, p50/p99 batch latency, resident memory after loading, and
the embedding cosine and top-1 agreement to torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from engine.tools.export import export_image
from engine.tools.fidelity import cosines, generated_frames
from processors.frames import PreparedImage
from processors.image import ImageProcessor
from processors.onnx_image import OnnxImageProcessor
from processors.params import ImageParams, TextParams


def rss_mb() -> float:
    """This process's resident memory now (Linux), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def import_mb(modules: str) -> float:
    """Peak resident memory of a fresh interpreter that imports ``modules``, MB."""
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
    code = f"import {modules}; print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True).stdout
    return int(out) / 1e3


def session(path: Path, threads: int) -> Any:
    """The route's session, on ``threads`` intra-op threads like torch's."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(
    runtimes: dict[str, Callable[[Sequence[PreparedImage]], Any]], items: list[PreparedImage], seconds: float
) -> dict[str, dict[str, float]]:
    """Each runtime's laps over ``items``, taken in turn (round robin), so a
    neighbour's load on a shared box falls on all of them alike."""
    for embed in runtimes.values():
        embed(items)  # warm-up: first-call allocations and kernel choice
    laps: dict[str, list[float]] = {name: [] for name in runtimes}
    end = time.perf_counter() + seconds * len(runtimes)
    while time.perf_counter() < end or min(len(v) for v in laps.values()) < 5:
        for name, embed in runtimes.items():
            t0 = time.perf_counter()
            embed(items)
            laps[name].append(time.perf_counter() - t0)
    out = {}
    for name, lap in laps.items():
        lap.sort()
        out[name] = {
            "items_s": len(items) * len(lap) / sum(lap),
            "p50_ms": statistics.median(lap) * 1e3,
            "p99_ms": lap[min(len(lap) - 1, int(len(lap) * 0.99))] * 1e3,
        }
    return out


def text(args: argparse.Namespace) -> None:
    """MiniLM: torch (transformers) vs ONNX fp32 vs dynamic int8, tokenisation included."""
    from engine.tools.export_text import export_text, sample_sentences
    from processors.onnx_text import OnnxTextProcessor
    from processors.sentences import PreparedText
    from processors.text import TextProcessor

    items = [PreparedText(t, 0, False) for t in sample_sentences(64, seed=1)]
    with tempfile.TemporaryDirectory() as tmp:
        exported = {e.precision: e for e in export_text(TextParams(), Path(tmp), int8=True, samples=32)}
        runtimes: dict[str, Any] = {"torch fp32": TextProcessor(TextParams(), "cpu")}
        for precision, label in (("fp32", "onnx fp32"), ("int8-dynamic", "onnx int8")):
            path = str(exported[precision].path)
            runtimes[label] = OnnxTextProcessor(TextParams(runtime="onnx", onnx_path=path), "cpu")
            runtimes[label].session = session(exported[precision].path, args.threads)

        def vecs(proc: Any, batch: list[PreparedText]) -> Any:
            return np.stack([f.embedding for f in proc.run(batch)])

        ref = vecs(runtimes["torch fp32"], items)
        print(f"all-MiniLM-L6-v2, sentences of 3-60 words, max_tokens 128, {args.threads} threads")
        print(
            f"{'runtime':<11} {'file MB':>8} {'cosine':>7} {'b1 it/s':>8} {'b1 p99':>8} "
            f"{'b32 it/s':>9} {'b32 p99':>9}"
        )
        runs = {label: proc.run for label, proc in runtimes.items()}
        b1s, b32s = timed(runs, items[:1], args.seconds), timed(runs, items[:32], args.seconds)
        base = b32s["torch fp32"]["items_s"]
        for label, proc in runtimes.items():
            cos = float(cosines(vecs(proc, items), ref).mean())
            precision = "fp32" if label == "onnx fp32" else "int8-dynamic"
            size = exported[precision].path.stat().st_size / 1e6 if label != "torch fp32" else float("nan")
            b1, b32 = b1s[label], b32s[label]
            print(
                f"{label:<11} {size:>8.1f} {cos:>7.4f} {b1['items_s']:>8.1f} {b1['p99_ms']:>6.1f}ms "
                f"{b32['items_s']:>9.1f} {b32['p99_ms']:>7.1f}ms  ({b32['items_s'] / base:.2f}x torch at b32)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v3_small", help="an image CNN, or minilm (the text route)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per runtime and batch size")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "minilm":
        return text(args)
    bare = {"torch": import_mb("torch, torchvision"), "onnxruntime": import_mb("onnxruntime")}
    params = ImageParams(model=args.model, faces=False)
    frames = generated_frames(64, params.input_size, seed=1)
    items = [PreparedImage(f"cam{i}", px, np.zeros((48, 64), np.uint8), {}) for i, px in enumerate(frames)]
    with tempfile.TemporaryDirectory() as tmp:
        exported = {e.precision: e for e in export_image(params, Path(tmp), int8="static", samples=32)}
        runtimes: dict[str, Any] = {}
        memory: dict[str, float] = {}
        before = rss_mb()
        runtimes["torch fp32"] = ImageProcessor(params, "cpu")
        runtimes["torch fp32"].embed(items[:32])  # the memory a batch of 32 takes counts
        memory["torch fp32"] = rss_mb() - before
        for precision, label in (("fp32", "onnx fp32"), ("int8-static", "onnx int8")):
            before = rss_mb()
            onnx = ImageParams(
                model=args.model, faces=False, runtime="onnx", onnx_path=str(exported[precision].path)
            )
            runtimes[label] = OnnxImageProcessor(onnx, "cpu")
            runtimes[label].session = session(exported[precision].path, args.threads)
            runtimes[label].embed(items[:32])
            memory[label] = rss_mb() - before
        ref = runtimes["torch fp32"].embed(items)[0]
        print(f"{args.model}, {params.input_size}x{params.input_size}, {args.threads} threads, "
              f"onnxruntime {runtimes['onnx fp32'].providers[0]}")  # fmt: skip
        print(
            f"peak RSS of a bare import: torch+torchvision {bare['torch']:.0f} MB, "
            f"onnxruntime {bare['onnxruntime']:.0f} MB; +RSS: the model loaded and one batch of 32 run"
        )
        print(f"{'runtime':<11} {'file MB':>8} {'+RSS MB':>8} {'cosine':>7} {'top-1':>6} "
              f"{'b1 it/s':>8} {'b1 p99':>8} {'b32 it/s':>9} {'b32 p99':>9}")  # fmt: skip
        embeds = {label: proc.embed for label, proc in runtimes.items()}
        b1s, b32s = timed(embeds, items[:1], args.seconds), timed(embeds, items[:32], args.seconds)
        base = b32s["torch fp32"]["items_s"]
        for label, proc in runtimes.items():
            emb = proc.embed(items)[0]
            cos = float(cosines(emb, ref).mean())
            precision = "fp32" if label == "onnx fp32" else "int8-static"
            top1 = 1.0 if label == "torch fp32" else exported[precision].fidelity.top1
            size = exported[precision].path.stat().st_size / 1e6 if label != "torch fp32" else float("nan")
            b1, b32 = b1s[label], b32s[label]
            print(
                f"{label:<11} {size:>8.1f} {memory[label]:>8.0f} {cos:>7.4f} {top1:>6.1%} "
                f"{b1['items_s']:>8.1f} {b1['p99_ms']:>6.1f}ms {b32['items_s']:>9.1f} {b32['p99_ms']:>7.1f}ms"
                f"  ({b32['items_s'] / base:.2f}x torch at b32)"
            )


if __name__ == "__main__":
    main()
