"""Where the engine's time goes: the bus benchmark's load, the engine in process under cProfile.

    .venv/bin/python benchmarks/profile_engine.py [--rate 11000] [--seconds 6] [--durable] [--sort tottime]

The engine runs in this process (same config as ``benchmarks/bus.py``, core
mode unless ``--durable``) and a separate publisher process sends paced 1 KB
text events from 1,000 sources, so the profile holds only the engine's work.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bus  # noqa: E402

from engine.config.models import parse_config  # noqa: E402
from engine.runtime.engine import Engine  # noqa: E402
from engine.runtime.server import EmbeddedServer  # noqa: E402

PUBLISHER = """
import asyncio, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import nats, bus
async def main():
    nc = await nats.connect({url!r})
    await bus.paced(nc, lambda s: bus.BENCH.input(f"s{{s}}", "text"), {rate}, {seconds}, 1000, {{}})
    await nc.close()
asyncio.run(main())
"""


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=11_000)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--durable", action="store_true")
    ap.add_argument("--sort", default="tottime", help="pstats order: tottime or cumulative")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--callers", default="", help="also print who calls functions matching this")
    ap.add_argument("--save", type=Path, help="write the raw profile here (for snakeviz, pstats)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedServer(tmp) as server:
        text = bus.CONFIG.format(
            prefix=bus.BENCH.prefix,
            idle=20,
            durable=str(args.durable).lower(),
            prompt="false",
            record=1024**3,
        )
        engine = Engine(parse_config(tomllib.loads(text), env={}))
        await engine.start(server.url)
        code = PUBLISHER.format(
            root=str(ROOT),
            bench=str(ROOT / "benchmarks"),
            url=server.url,
            rate=args.rate,
            seconds=args.seconds,
        )
        pub = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
        # CPU time, not wall time: the figures hold on a box busy with other work too.
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
        t0, cpu0 = time.monotonic(), time.process_time()
        await pub.wait()
        await asyncio.sleep(1.0)
        prof.disable()
        took = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        received = sum(engine.stats.received.values())
        print(
            f"received {received} events, {engine.stats.results} results in {took:.1f} s, "
            f"{1e6 * cpu / max(1, received):.0f} µs CPU per event (under the profiler)"
        )
        await engine.stop()
    stats = pstats.Stats(prof).sort_stats(args.sort)
    stats.print_stats(args.top)
    if args.callers:
        stats.print_callers(args.callers)
    if args.save:
        stats.dump_stats(args.save)


if __name__ == "__main__":
    asyncio.run(main())
