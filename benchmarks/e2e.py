"""The real mixed load: how many camera+microphone+caption sources one engine sustains.

    .venv/bin/python benchmarks/e2e.py [--seconds 60] [--start 1] [--max 16] [--config routing.toml]

Each source sends 30 fps 640x480 JPEG frames, 16 kHz audio in 100 ms chunks
(PCM) and one caption per second, at the pace they would come from a real
device. The engine is ``autoglm run`` in its own process with the routes of
``--config`` (default: the repository's routing.toml: mobilenet_v3_small,
MFCC, MiniLM on the CPU), GLM ``none``, durable mode, and every route set to
``intake = "real_time"`` with ``max_staleness_ms = 1000`` so that falling
behind shows up as skipped frames instead of a growing queue.

K = --start, --start+1, ... each for --seconds with a fresh engine. K is
sustained when no event was skipped as stale and none was lost (every
published event is in a result, a DLQ record, or the rate-limited count).
The largest sustained K is reported with p50/p99 latency per modality (the
event's timestamp to the arrival of its result, which includes waiting for
the 1 s window to close; the last 3 s of a run, whose windows close by idle
timeout, are left out), peak RSS of the engine and its batch-size histograms.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import signal
import sys
import tempfile
import time
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
import numpy as np
import orjson
from bus import pct
from soak import peak_rss_kib

from engine.contracts.subjects import Subjects
from engine.observe.service import find_engines
from engine.runtime.server import EmbeddedServer
from engine.tools.demo import shapes_frames
from engine.tools.publish import sync_with_server
from engine.wire.codec import encode_headers

ROOT = Path(__file__).resolve().parent.parent
E2E = Subjects("e2e")  # the prefix config_text sets
FPS, CHUNK_MS, RATE = 30, 100, 16_000
PCM = f"audio/pcm;rate={RATE};channels=1;format=s16le"
CAPTIONS = ["a red ball rolls across the floor", "someone walks past the door", "the room is quiet"]


def config_text(base: Path, data_dir: Path, reuse_below: float | None = None, words: bool = True) -> str:
    """``base`` with every route on real_time intake and a fresh data dir, as TOML;
    ``reuse_below`` set on the image route when given; ``words=False`` leaves
    out the routes' ``also`` processors (the article's CNN, MFCC and MiniLM only)."""
    cfg = tomllib.loads(base.read_text())
    cfg.setdefault("nats", {})["data_dir"] = str(data_dir)
    cfg["nats"]["subject_prefix"] = E2E.prefix
    cfg["nats"].pop("url", None)
    lines = []
    for key in ("nats", "limits", "aligner"):
        if key in cfg:
            lines.append(f"[{key}]")
            lines += [f"{k} = {_toml(v)}" for k, v in cfg[key].items()]
    lines.append('[glm]\nbackend = "none"\ntemplate = "{source}"')
    for route in cfg["routes"]:
        route = {**route, "intake": "real_time", "max_staleness_ms": 1000}
        if reuse_below is not None and route.get("modality") == "image":
            route["params"] = {**route.get("params", {}), "reuse_below": reuse_below}
        lines.append("[[routes]]")
        lines += [f"{k} = {_toml(v)}" for k, v in route.items() if not isinstance(v, dict) and k != "also"]
        for sub in ("params", "batch"):
            if sub in route:
                lines.append(f"[routes.{sub}]")
                lines += [f"{k} = {_toml(v)}" for k, v in route[sub].items()]
        for also in route.get("also", []) if words else []:  # the processors beside the route's own
            lines += ["[[routes.also]]", f"processor = {_toml(also['processor'])}"]
            if also.get("params"):
                lines.append("[routes.also.params]")
                lines += [f"{k} = {_toml(v)}" for k, v in also["params"].items()]
    return "\n".join(lines) + "\n"


def static_frames(index: int, n: int, width: int, height: int) -> list[bytes]:
    """``n`` JPEG frames of one still scene (the first of :func:`shapes_frames`)
    with fresh sensor noise in each, as a fixed camera sees an empty room."""
    import cv2  # after the engine's pixel cap, as in shapes_frames

    still = cv2.imdecode(np.frombuffer(shapes_frames(index, 1, width, height)[0], np.uint8), cv2.IMREAD_COLOR)
    rng = np.random.default_rng(index)
    out = []
    for _ in range(n):
        noisy = np.clip(still.astype(np.int16) + rng.normal(0, 2, still.shape), 0, 255).astype(np.uint8)
        out.append(cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes())
    return out


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return orjson.dumps(v).decode()
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


def audio_chunks(n: int) -> list[bytes]:
    t = np.arange(RATE * CHUNK_MS // 1000) / RATE
    return [(np.sin(2 * math.pi * (200 + 40 * k) * t) * 8000).astype("<i2").tobytes() for k in range(n)]


async def source(
    nc: Any,
    k: int,
    seconds: float,
    frames: list[bytes],
    chunks: list[bytes],
    sent: dict[str, tuple[str, int]],
    trial_k: int,
) -> None:
    """One device: frames, audio chunks and captions on their own clocks, paced to real time."""
    name = f"dev{k}"
    t0 = time.time_ns()
    plan = [(i * 1_000_000_000 // FPS, "image", i) for i in range(int(seconds * FPS))]
    plan += [(i * CHUNK_MS * 1_000_000, "audio", i) for i in range(int(seconds * 1000 / CHUNK_MS))]
    plan += [(i * 1_000_000_000 + 500_000_000, "text", i) for i in range(int(seconds))]
    plan.sort()
    for offset, mod, i in plan:
        ts = t0 + offset
        delay = (ts - time.time_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        if mod == "image":
            body, ct = frames[i % len(frames)], "image/jpeg"
        elif mod == "audio":
            body, ct = chunks[i % len(chunks)], PCM
        else:
            body, ct = CAPTIONS[(i // 3) % len(CAPTIONS)].encode(), "text/plain"
        eid = f"k{trial_k}-{name}-{mod}-{i}"  # unique per trial: the stream dedupes ids it has seen
        sent[eid] = (mod, ts)
        await nc.publish(E2E.input(name, mod), body, headers=encode_headers(ts, ct, event_id=eid))


async def trial(
    url: str, cfg: Path, k: int, seconds: float, frames: list[list[bytes]], chunks: list[bytes]
) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.tools.cli", "run", "--config", str(cfg), "--nats-url", url,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 300)
    assert b"engine running" in line, line
    nc = await nats.connect(url)
    sent: dict[str, tuple[str, int]] = {}
    lat: dict[str, list[float]] = defaultdict(list)
    fused: set[str] = set()
    rejected: set[str] = set()

    # The last windows of a finite stream close by idle timeout (2 s), not by
    # newer events: their latency says nothing about a live stream.
    tail_from = time.time_ns() + int((seconds - 3) * 1e9)

    async def on_out(msg: Any) -> None:
        now = time.time_ns()
        for ids in orjson.loads(msg.data)["events"].values():
            for eid in ids:
                if eid in sent and eid not in fused:
                    mod, ts = sent[eid]
                    if ts < tail_from:
                        lat[mod].append((now - ts) / 1e6)
                fused.add(eid)

    async def on_dlq(msg: Any) -> None:
        rejected.add(orjson.loads(msg.data).get("event_id"))

    await nc.subscribe(E2E.results, cb=on_out, pending_msgs_limit=1_000_000, pending_bytes_limit=2**32)
    await nc.subscribe(E2E.rejections, cb=on_dlq)
    await sync_with_server(nc)
    peak = 0.0
    pubs = [
        asyncio.create_task(source(nc, i, seconds, frames[i % len(frames)], chunks, sent, k))
        for i in range(k)
    ]
    while not all(p.done() for p in pubs):
        await asyncio.sleep(1.0)
        peak = max(peak, peak_rss_kib(proc.pid) / 1024)
    await asyncio.gather(*pubs)
    await nc.flush()
    deadline = time.monotonic() + 10  # windows close, the last batches finish
    while time.monotonic() < deadline and len(fused | rejected) < len(sent):  # noqa: ASYNC110
        await asyncio.sleep(0.25)
    [stats] = [
        r for r in await find_engines(nc) if (r.get("metadata") or {}).get("subject_prefix") == E2E.prefix
    ] or [{}]
    data = (stats.get("endpoints") or [{}])[0].get("data") or {}
    peak = max(peak, peak_rss_kib(proc.pid) / 1024)
    await nc.close()
    proc.send_signal(signal.SIGTERM)
    await proc.wait()
    stale = sum((data.get("stale") or {}).values())
    limited = sum((data.get("rate_limited") or {}).values())
    lost = len(sent) - len(fused & sent.keys()) - len(rejected & sent.keys()) - stale - limited
    return {"k": k, "sent": len(sent), "fused": len(fused & sent.keys()), "rejected": len(rejected),
            "stale": stale, "rate_limited": limited, "lost": lost, "peak_rss_mib": peak, "lat": lat,
            "batches": data.get("batches", {})}  # fmt: skip


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--start", type=int, default=1)
    ap.add_argument("--max", type=int, default=16)
    ap.add_argument("--config", type=Path, default=ROOT / "routing.toml")
    ap.add_argument(
        "--scene",
        choices=("moving", "static"),
        default="moving",
        help="moving shapes, or a still scene with sensor noise (a door camera at night)",
    )
    ap.add_argument("--reuse-below", type=float, help="the image route's params.reuse_below")
    ap.add_argument(
        "--no-words",
        action="store_true",
        help="leave out the also processors (ocr, vad, asr): the article's three processors only",
    )
    args = ap.parse_args()
    import torch

    gpu = "yes" if torch.cuda.is_available() else "none"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, GPU {gpu}"
    )
    print(
        f"per source: {FPS} fps 640x480 JPEG + {RATE} Hz PCM in {CHUNK_MS} ms chunks + 1 caption/s; "
        f"{args.seconds:g} s per K; routes from {args.config.name}, all real_time (max_staleness_ms 1000)"
    )
    make = shapes_frames if args.scene == "moving" else static_frames
    frames = [make(i, FPS * 2, 640, 480) for i in range(4)]
    print(
        f"scene: {args.scene}; image params.reuse_below = {args.reuse_below}; "
        f"words (also processors) {'off' if args.no_words else 'on'}"
    )
    chunks = audio_chunks(10)
    best: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="autoglm-e2e-") as tmp:
        server = EmbeddedServer(Path(tmp) / "nats")
        url = await asyncio.to_thread(server.start)
        cfg = Path(tmp) / "e2e.toml"
        cfg.write_text(config_text(args.config, Path(tmp) / "data", args.reuse_below, not args.no_words))
        for k in range(args.start, args.max + 1):
            r = await trial(url, cfg, k, args.seconds, frames, chunks)
            ok = r["stale"] == 0 and r["lost"] == 0
            p99 = {m: pct(v, 99) for m, v in r["lat"].items()}
            lats = ", ".join(f"{m} {v:.0f}" for m, v in sorted(p99.items()))
            verdict = "sustained" if ok else "NOT sustained"
            print(
                f"K={k:2d}: sent {r['sent']:6d}, fused {r['fused']:6d}, DLQ {r['rejected']}, "
                f"stale {r['stale']}, rate-limited {r['rate_limited']}, lost {r['lost']}; "
                f"p99 ms {lats}; peak RSS {r['peak_rss_mib']:.0f} MiB -> {verdict}",
                flush=True,
            )
            if not ok:
                break
            best = r
        await asyncio.to_thread(server.stop)
    if best is None:
        print(f"\nnot even K={args.start} was sustained")
        return 1
    k = best["k"]
    print(
        f"\nlargest K sustained for {args.seconds:g} s: {k} "
        f"({k * FPS} frames/s, {k * 1000 // CHUNK_MS} audio chunks/s, {k} captions/s)"
    )
    for mod in ("image", "audio", "text"):
        xs = best["lat"].get(mod, [])
        print(f"  {mod:5}  p50 {pct(xs, 50):7.0f} ms  p99 {pct(xs, 99):7.0f} ms  ({len(xs)} events)")
    print(f"  peak RSS of the engine {best['peak_rss_mib']:.0f} MiB")
    for name, b in best["batches"].items():
        print(f"  batches {name:16} mean {b['mean_size']:5.2f}  sizes {b.get('sizes', {})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
