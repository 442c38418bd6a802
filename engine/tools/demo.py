"""``autoglm demo``: the embedded server, the engine and a synthetic stream.

Each of K sources sends moving-shapes frames at 30 fps, 16 kHz audio in 100 ms
chunks and a caption every second, plus (every 5 s) one corrupt frame and one
invalid UTF-8 caption so the DLQ path shows too. The demo then checks that
every event it published is accounted for: fused into a result, rejected with
a reason, rate-limited, or skipped as stale (``real_time`` routes).
"""

from __future__ import annotations

import asyncio
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from opentelemetry.trace import SpanKind

from engine.config.models import AlsoConfig, EngineConfig, Overrides, RouteConfig
from engine.contracts.subjects import Subjects
from engine.observe.tracing import traceparent_of
from engine.tools.publish import connect, sync_with_server
from engine.transport.security import connect_kwargs, redact_url
from engine.wire.codec import encode_headers

FPS = 30
AUDIO_CHUNK_MS = 100
AUDIO_RATE = 16_000
CAPTIONS = [
    "a red ball rolls across the floor",
    "someone is talking near the camera",
    "the room is quiet and still",
    "a blue box slides down the wall",
    "two shapes cross in the middle of the scene",
]


#: Spoken in the demo's audio (made with espeak-ng: tests/data/README.md).
SPEECH = Path(__file__).resolve().parents[2] / "tests" / "data" / "speech.wav"


def default_config() -> EngineConfig:
    """The built-in configuration, used when no routing.toml is around: the
    article's processors, and beside them the ones that give the GLM words."""
    return EngineConfig(
        routes=(
            RouteConfig(modality="image", processor="cnn", also=(AlsoConfig(processor="ocr"),)),
            RouteConfig(
                modality="audio",
                processor="mfcc",
                also=(AlsoConfig(processor="vad"), AlsoConfig(processor="asr")),
            ),
            RouteConfig(modality="text", processor="minilm"),
        )
    )


def shapes_frames(index: int, n: int, width: int, height: int) -> list[bytes]:
    """``n`` JPEG frames of a circle and a square moving over a gradient."""
    import cv2  # here, not at the top: the engine's image route loads OpenCV first, with its pixel cap

    rng = np.random.default_rng(index)
    colour = tuple(int(c) for c in rng.integers(64, 255, 3))
    base = np.tile(np.linspace(30, 90, width, dtype=np.uint8), (height, 1))
    frames = []
    for k in range(n):
        img = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR)
        phase = 2 * math.pi * k / n
        cx = int(width / 2 + width / 3 * math.cos(phase))
        cv2.circle(img, (cx, height // 3), max(4, height // 8), colour, -1)
        sy = int(height / 2 + height / 4 * math.sin(phase))
        cv2.rectangle(img, (width // 2, sy), (width // 2 + height // 6, sy + height // 6), (200, 80, 40), -1)
        # A sign for OCR to read, in the bottom band the shapes never cross.
        scale = height / 160
        org = (int(6 * scale), height - int(8 * scale))
        cv2.putText(img, f"EXIT {index + 1}", org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 3)
        frames.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes())
    return frames


def speech_clip() -> np.ndarray | None:
    """The committed speech clip as float samples at 16 kHz (``None`` when this
    is an installed package without the tests folder: tones only then)."""
    if not SPEECH.exists():
        return None
    import soundfile

    samples, rate = soundfile.read(SPEECH, dtype="float32")
    return np.asarray(samples, np.float32) if rate == AUDIO_RATE else None


def audio_chunk(k: int, index: int, speech: np.ndarray | None = None) -> bytes:
    """100 ms of s16le over low noise. With ``speech``, it is spoken every
    10 s (from second 1); otherwise, and in the seconds between, a tone in the
    first half of each second."""
    n = AUDIO_RATE * AUDIO_CHUNK_MS // 1000
    t = (np.arange(n) + k * n) / AUDIO_RATE
    rng = np.random.default_rng(k * 7919 + index)
    noise = rng.normal(0, 0.003, n)
    at = (k * n) % (10 * AUDIO_RATE) - AUDIO_RATE  # where in the clip this chunk is
    if speech is not None and 0 <= at < len(speech):
        voice = np.zeros(n, np.float32)
        part = speech[at : at + n]
        voice[: len(part)] = part
        return np.clip((voice + noise) * 32767, -32768, 32767).astype("<i2").tobytes()
    tone = 0.3 * np.sin(2 * math.pi * (220 + 40 * index) * t) if (k % 10) < 5 else 0.0
    return np.clip((tone + noise) * 32767, -32768, 32767).astype("<i2").tobytes()


class Tally:
    """What the demo published and what came back, per event id."""

    def __init__(self) -> None:
        self.published: Counter[str] = Counter()
        self.sent_ts: dict[str, int] = {}
        self.fused: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.windows = 0
        self.latencies_ms: list[float] = []
        self.seen: set[str] = set()
        self.answers = 0
        self.last_answer: tuple[str, str] | None = None
        #: Words the results carried: transcripts, and text read in frames.
        self.heard: list[str] = []
        self.read: dict[str, None] = {}
        self.spoken_prompt = ""

    def on_result(self, record: dict[str, Any], now: int) -> None:
        self.windows += 1
        features = record.get("features") or {}
        heard = features.get("audio", {}).get("heard", [])
        self.heard.extend(heard)
        self.read.update(dict.fromkeys(features.get("image", {}).get("seen", [])))
        if heard and record.get("prompt"):
            self.spoken_prompt = str(record["prompt"])
        if record.get("answer"):
            self.answers += 1
            self.last_answer = (record["source"], str(record["answer"]))
        for mod, ids in record["events"].items():
            for eid in ids:
                self.fused[mod] += 1
                self.seen.add(eid)
                if eid in self.sent_ts:
                    self.latencies_ms.append((now - self.sent_ts[eid]) / 1e6)
        for ids in (record.get("skipped") or {}).values():  # rate-limited, stale: named, not fused
            self.seen.update(ids)

    def on_reject(self, record: dict[str, Any]) -> None:
        self.rejected[record["reason"]] += 1
        if record.get("event_id"):
            self.seen.add(record["event_id"])

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(self.latencies_ms, q))


async def _source_loop(
    nc: Any,
    subjects: Subjects,
    index: int,
    seconds: float,
    tally: Tally,
    frames: list[bytes],
    inject_bad: bool,
    tracer: Any = None,
    speech: np.ndarray | None = None,
) -> None:
    name = f"cam{index}"
    t0 = time.time_ns()
    frame_ns = 1_000_000_000 // FPS
    chunk_ns = AUDIO_CHUNK_MS * 1_000_000
    plan: list[tuple[int, str, int]] = []
    end = int(seconds * 1e9)
    plan += [(k * frame_ns, "image", k) for k in range(end // frame_ns)]
    plan += [(k * chunk_ns, "audio", k) for k in range(end // chunk_ns)]
    plan += [(k * 1_000_000_000 + 500_000_000, "text", k) for k in range(int(seconds))]
    if inject_bad:
        plan += [(k * 5_000_000_000 + 2_500_000_000, "bad", k) for k in range(int(seconds // 5))]
    plan.sort()
    # Every 5 s one frame is replaced by a corrupt JPEG (it takes a real
    # frame's slot, so the rate limiter does not skip it first).
    bad = {(j * 5 + 2) * FPS + FPS // 2 for j in range(int(seconds // 5))} if inject_bad else set()
    for offset, kind, k in plan:
        ts = t0 + offset
        delay = (ts - time.time_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        if kind == "image":
            body = b"\xff\xd8\xff\xe0 not really a jpeg" if k in bad else frames[k % len(frames)]
            eid, ct, mod = f"{name}-img-{k}", "image/jpeg", "image"
        elif kind == "audio":
            eid, body, mod = f"{name}-aud-{k}", audio_chunk(k, index, speech), "audio"
            ct = f"audio/pcm;rate={AUDIO_RATE};channels=1;format=s16le"
        elif kind == "text":
            # A captioner repeats itself while the scene holds: a new line every 3 s.
            caption = CAPTIONS[(k // 3 + index) % len(CAPTIONS)]
            eid, body, ct, mod = f"{name}-txt-{k}", caption.encode(), "text/plain", "text"
        else:  # an invalid UTF-8 caption
            eid, body, ct, mod = f"{name}-badtxt-{k}", b"caption \xc3\x28 broken", "text/plain", "text"
        tally.published[mod] += 1
        tally.sent_ts[eid] = ts
        traceparent = None
        if tracer is not None:  # the producer's own span, so a trace starts before the engine
            attrs = {"autoglm.event_id": eid}
            span = tracer.start_span("demo.publish", kind=SpanKind.PRODUCER, attributes=attrs)
            traceparent = traceparent_of(span)
            span.end()
        hdrs = encode_headers(ts, ct, event_id=eid, traceparent=traceparent)
        await nc.publish(subjects.input(name, mod), body, headers=hdrs)  # type: ignore[arg-type]


def _line(elapsed: float, tally: Tally, stats: Any) -> str:
    pub = tally.published
    rej = sum(tally.rejected.values())
    limited = sum(stats.rate_limited.values())
    return (
        f"[{elapsed:5.1f}s] sent img {pub['image']:5d} aud {pub['audio']:4d} txt {pub['text']:3d} | "
        f"windows {tally.windows:4d} | rejected {rej:3d} | rate-limited {limited:3d} | "
        f"p50 {tally.percentile(50):7.0f} ms  p99 {tally.percentile(99):7.0f} ms"
    )


async def run_demo(
    config: EngineConfig,
    *,
    seconds: float = 10.0,
    sources: int = 2,
    nats_url: str | None = None,
    width: int = 320,
    height: int = 240,
    inject_bad: bool = True,
    config_path: str | None = None,
    overrides: Overrides | None = None,
    monitor_port: int | None = None,
) -> int:
    from engine.runtime.engine import Engine
    from engine.runtime.server import EmbeddedServer

    print(f"autoglm demo: {sources} source(s) for {seconds:g} s; loading models...", flush=True)
    # With its routing file, so `autoglm reload` works on the demo too.
    engine = Engine(config, config_path=config_path, overrides=overrides)
    # The demo owns the embedded server so its own subscriber outlives the
    # engine's drain and sees the last results; a fresh store each time, so an
    # earlier interrupted demo's stream is not replayed into this one.
    store = tempfile.TemporaryDirectory(prefix="autoglm-demo-")
    server = None if (nats_url or config.nats.url) else EmbeddedServer(store.name)
    if server is not None:
        nats_url = await asyncio.to_thread(server.start)
    try:
        demo = _demo_on(engine, config, nats_url, seconds, sources, width, height, inject_bad)
        url = nats_url or config.nats.url
        if monitor_port is not None and url:
            return await _with_monitor(url, config, monitor_port, demo)
        return await demo
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        store.cleanup()


async def _demo_on(
    engine: Any,
    config: EngineConfig,
    nats_url: str | None,
    seconds: float,
    sources: int,
    width: int,
    height: int,
    inject_bad: bool,
) -> int:
    url = await engine.start(nats_url)
    subjects = Subjects(config.nats.subject_prefix)
    print(f"autoglm demo: engine up on {redact_url(url)}", flush=True)
    if engine.metrics is not None:
        where = f"http://{config.metrics.host}:{engine.metrics.port}/metrics"
        print(f"autoglm demo: metrics on {where}", flush=True)
    tally = Tally()
    nc = await connect(url, **connect_kwargs(config.nats))

    async def on_out(msg: Any) -> None:
        tally.on_result(orjson.loads(msg.data), time.time_ns())

    async def on_dlq(msg: Any) -> None:
        tally.on_reject(orjson.loads(msg.data))

    await nc.subscribe(subjects.results, cb=on_out)
    await nc.subscribe(subjects.rejections, cb=on_dlq)
    await sync_with_server(nc)
    frames = [shapes_frames(i, FPS * 2, width, height) for i in range(sources)]
    speech = speech_clip()
    started = time.monotonic()
    pubs = [
        asyncio.create_task(
            _source_loop(
                nc, subjects, i, seconds, tally, frames[i], inject_bad, engine.tracing.tracer, speech
            )
        )
        for i in range(sources)
    ]
    tty = sys.stdout.isatty()
    while not all(p.done() for p in pubs):
        await asyncio.sleep(1.0)
        line = _line(time.monotonic() - started, tally, engine.stats)
        print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
    await asyncio.gather(*pubs)
    await nc.flush()
    await _end_of_stream(engine, tally)
    await engine.stop()
    await nc.drain()
    if tty:
        print()
    return summary(tally, engine, seconds, sources)


async def _with_monitor(url: str, config: EngineConfig, port: int, demo: Awaitable[int]) -> int:
    """``--monitor``: the live page (engine/monitor) beside the demo, on its own
    connection, as ``autoglm monitor`` would run it; it stops with the demo."""
    from engine.monitor.server import Monitor

    nc = await connect(url, **connect_kwargs(config.nats))
    monitor = Monitor(nc, config.nats.subject_prefix, port=port)
    up = asyncio.Event()

    def ready(page: str) -> None:
        print(f"autoglm demo: monitor on {page}", flush=True)
        up.set()

    serving = asyncio.create_task(monitor.serve(ready))
    await asyncio.wait([asyncio.create_task(up.wait()), serving], return_when=asyncio.FIRST_COMPLETED)
    try:
        return await demo
    finally:
        monitor.stop()
        await serving
        await nc.close()


async def _until(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        await asyncio.sleep(0.05)  # the engine runs on this loop: a poll, not a wait for it


async def _end_of_stream(engine: Any, tally: Tally, timeout: float = 30.0) -> None:
    """The producers are done: once the engine has every event, close every
    window now (nothing more will come) and wait for the last records."""
    sent = sum(tally.published.values())
    await _until(lambda: sum(engine.stats.received.values()) >= sent, timeout)
    await engine.idle()
    await engine.flush_windows()
    await _until(lambda: len(tally.seen) >= sent, timeout)


def summary(tally: Tally, engine: Any, seconds: float, sources: int) -> int:
    mods = ("image", "audio", "text")
    stats, aligner_counts = engine.stats, engine.aligner.counts

    def per(c: Counter[str]) -> str:
        return ", ".join(f"{m} {c[m]}" for m in mods)

    sent = sum(tally.published.values())
    limited = sum(stats.rate_limited.values())
    stale = sum(stats.stale.values())
    accounted = len(tally.seen)
    print(f"\nautoglm demo summary ({seconds:g} s, {sources} source(s))")
    print(f"  events published      {per(tally.published)}")
    print(f"  engine received       {per(stats.received)}")
    print(f"  fused into results    {per(tally.fused)} in {tally.windows} windows")
    rej = ", ".join(f"{r} {n}" for r, n in sorted(tally.rejected.items())) or "none"
    print(f"  rejected (DLQ)        {rej}")
    print(f"  rate-limited          {limited}")
    if stale:
        print(f"  skipped as stale      {stale} (real_time routes)")
    outcomes: Counter[str] = Counter()
    for (_, outcome), n in aligner_counts.items():
        outcomes[outcome] += n
    print("  aligner outcomes      " + (", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "none"))
    for route in engine.routes:
        b = route.batcher.stats
        sizes = " ".join(f"{k}:{v}" for k, v in sorted(b.sizes.items()))
        print(
            f"  batches {route.config.modality:<6}({route.config.processor}) "
            f"{sum(b.sizes.values())} batches, "
            f"mean size {b.mean_batch:.1f} [size:count {sizes}], queue wait mean {b.mean_wait_ms:.1f} ms "
            f"max {b.wait_ns_max / 1e6:.1f} ms, dropped {b.dropped + b.rejected}"
        )
    g, gcfg = engine.glm.stats, engine.config.glm
    windows = g.sent + sum(g.skipped.values())
    saved = g.skipped["no_change"]
    print(
        f"  GLM ({gcfg.backend}, trigger {gcfg.trigger})  {g.sent} of {windows} windows sent"
        + (f", {saved} unchanged ({100 * saved / windows:.0f}% of calls saved)" if windows else "")
        + f", {g.calls} calls, {g.errors} errors"
        + "".join(f", {k} {v}" for k, v in sorted(g.skipped.items()) if k != "no_change")
    )
    if tally.heard or tally.read:
        print(f"  heard                 {', '.join(repr(h) for h in tally.heard[-3:]) or 'nothing'}")
        print(f"  text seen             {', '.join(repr(t) for t in list(tally.read)[:4]) or 'nothing'}")
    if tally.spoken_prompt:
        print("  a prompt with words   " + tally.spoken_prompt.replace("\n", "\n                        "))
    if tally.last_answer is not None:
        source, answer = tally.last_answer
        print(f"  answers               {tally.answers}; last, from {source}: {answer[:100]!r}")
    print(
        f"  latency publish->result  p50 {tally.percentile(50):.0f} ms, p99 {tally.percentile(99):.0f} ms "
        "(event time to result; includes waiting for the window to close)"
    )
    print(f"  accounted for         {accounted} of {sent} events")
    if accounted != sent:
        print(f"  LOST: {sent - accounted} event(s) have neither a result nor a DLQ record", file=sys.stderr)
        return 1
    return 0
