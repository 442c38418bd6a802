"""Events/s through the aligner alone (in process, no NATS) and its peak memory.

    .venv/bin/python benchmarks/aligner.py

For 1, 100 and 10,000 sources: admit + complete + poll for every event, in
round-robin over sources, event time advancing 1 ms per round, 100 ms
windows (so a window holds up to 100 events per source), three modalities
in turn. Features are prebuilt (a 16-float embedding plus two stats) so the
figure is the aligner's own cost. The baseline, measured in the same run, is
a plain dict-append loop over the same events: the floor any Python
implementation pays per event.
"""

from __future__ import annotations

import os
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from engine.align.aligner import Aligner
from engine.config.models import AlignerConfig
from engine.contracts.subjects import Subjects
from engine.contracts.types import ContentType, Features, InputEvent

MS = 1_000_000
T0 = 1_764_000_000_000 * MS
MODS = ("image", "audio", "text")


def make_events(sources: int, total: int) -> list[InputEvent]:
    ct = ContentType("text/plain")
    names = [f"s{i}" for i in range(sources)]
    return [
        InputEvent(
            Subjects().input(names[i % sources], MODS[i % 3]),  # type: ignore[arg-type]
            names[i % sources],
            MODS[i % 3],  # type: ignore[arg-type]
            T0 + (i // sources) * MS,
            ct,
            b"",
            f"e{i}",
        )
        for i in range(total)
    ]


def feed(events: list[InputEvent]) -> int:
    """Admit, complete and poll every event; returns the frames emitted."""
    feats = {m: Features(m, embedding=np.ones(16, np.float32), stats={"x": 1.0, "y": 2.0}) for m in MODS}  # type: ignore[arg-type]
    now = T0 + 10**12
    a = Aligner(AlignerConfig(window_ms=100, idle_timeout_ms=10**9, max_sources=20_000), lambda: now)
    frames = 0
    for i, e in enumerate(events):
        a.admit(e)
        a.complete(e.source, e.event_id, feats[e.modality])
        if i % 64 == 0:
            frames += len(a.poll())
    return frames + len(a.flush())


def run(sources: int, total: int) -> tuple[float, float, int, float]:
    events = make_events(sources, total)
    t0 = time.perf_counter()
    frames = feed(events)
    took = time.perf_counter() - t0
    # Memory in a second pass: tracemalloc slows Python code ~3x.
    tracemalloc.start()
    feed(events)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    t1 = time.perf_counter()
    sink: dict[str, list[tuple[int, str]]] = {}
    for e in events:
        sink.setdefault(e.source, []).append((e.ts_ns, e.event_id))
    base = time.perf_counter() - t1
    return total / took, peak / 2**20, frames, total / base


def main() -> None:
    print(
        f"aligner benchmark: {os.cpu_count()} cores, one used (single-threaded), "
        f"Python {sys.version.split()[0]}"
    )
    print(
        f"{'sources':>8} {'events':>8} {'events/s':>10} {'peak MiB':>9} {'frames':>7} "
        f"{'dict-append/s':>14} {'ratio':>6}"
    )
    for sources, total in ((1, 200_000), (100, 200_000), (10_000, 200_000)):
        rate, peak, frames, base = run(sources, total)
        print(
            f"{sources:>8} {total:>8} {rate:>10,.0f} {peak:>9.1f} {frames:>7} "
            f"{base:>14,.0f} {rate / base:>6.3f}"
        )


if __name__ == "__main__":
    main()
