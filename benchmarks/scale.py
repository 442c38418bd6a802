"""Scale-out: CPU-seconds per event at 1, 2 and 4 workers, and the failover time.

    .venv/bin/python benchmarks/scale.py [--rate 1500] [--seconds 20] [--sources 200]
                                         [--partitions 8] [--workers 1,2,4]

On a 2-core box more workers cannot finish sooner, so this measures what
predicts scaling on a box with more cores: the CPU time all worker processes
spend per event at the same offered load (``utime + stime`` from
``/proc/<pid>/stat``, measured over the loaded interval, less what the same
workers spend idle for as long: lease renewals, timers). Linear scaling
means the ratio to one worker stays near 1.0; the goal is within 15 %.

Then the failover: two workers under load, one SIGKILLed. Reported: the
events it held in flight (its partitions' pending and unacked inputs at the
kill), the time from the kill to the first result of one of its sources from
the new owner, and to the last of its backlog; and that nothing was lost or
duplicated.

One file-backed JetStream nats-server (the embedded binary), ``autoglm run``
workers as processes, passthrough processors on all three modalities (the
engine's own cost; the processors' work divides by partition the same way).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
import orjson

from benchmarks.soak import MODS, ROUTE, produce, read_stream
from engine.contracts.subjects import Subjects, partition_of
from engine.runtime.server import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
CONFIG = """
[nats]
subject_prefix = "soak"
max_ack_pending = 50000
partitions = {partitions}
lease_s = {lease}
[aligner]
window_ms = 200
allowed_lateness_ms = 50
idle_timeout_ms = 1000
{routes}
"""
SOAK = Subjects("soak")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def start_worker(cfg: Path, url: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.tools.cli", "run", "--config", str(cfg), "--nats-url", url,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 120)
    if b"engine running" not in line:
        raise RuntimeError(f"worker did not start: {line!r}")
    return proc


async def owners(js: Any) -> dict[str, str]:
    kv = await js.key_value("SOAK_WORKERS")
    out = {}
    watcher = await kv.watch("p.*", ignore_deletes=True)
    async for entry in watcher:
        if entry is None:
            break
        out[entry.key[2:]] = orjson.loads(entry.value)["worker"]
    await watcher.stop()
    return out


async def until(check: Any, what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


async def drained(js: Any) -> bool:
    return not (await js.stream_info("SOAK_IN")).state.messages


async def run_workers(k: int, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """One measurement at ``k`` workers, on a fresh server."""
    server = EmbeddedServer(tmp / f"nats-{k}")
    url = await asyncio.to_thread(server.start)
    cfg = tmp / "routing.toml"
    routes = "".join(ROUTE.format(m=m) for m in MODS)
    cfg.write_text(CONFIG.format(partitions=args.partitions, lease=args.lease, routes=routes))
    workers = [await start_worker(cfg, url) for _ in range(k)]
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:

        async def spread() -> bool:
            held = await owners(js)
            return len(held) == args.partitions + (args.partitions > 1) and len(set(held.values())) == k

        await until(spread, f"{k} workers sharing the partitions")
        pids = [w.pid for w in workers]
        idle0 = sum(map(cpu_seconds, pids))
        await asyncio.sleep(args.seconds)  # the idle baseline: as long as the loaded run
        idle = sum(map(cpu_seconds, pids)) - idle0
        accepted: set[str] = set()
        t0, c0 = time.monotonic(), sum(map(cpu_seconds, pids))
        failed = await produce(js, args.rate, args.sources, args.seconds, accepted, asyncio.Event())
        try:
            await until(lambda: drained(js), "the workers to finish the backlog")
        except RuntimeError:
            for info in await js.consumers_info("SOAK_IN"):
                print(
                    info.name,
                    info.config.filter_subject,
                    "pending",
                    info.num_pending,
                    "ack_pending",
                    info.num_ack_pending,
                    "redelivered",
                    info.num_redelivered,
                )
            print((await js.stream_info("SOAK_IN")).state)
            raise
        took, used = time.monotonic() - t0, sum(map(cpu_seconds, pids)) - c0
        held = Counter((await owners(js)).values())
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            await asyncio.wait_for(w.wait(), 60)
        await nc.close()
        await asyncio.to_thread(server.stop)
    n = len(accepted)
    busy = max(0.0, used - idle * took / args.seconds)
    return {
        "events": n,
        "failed": failed,
        "cpu_s": used,
        "idle_cpu_s": idle * took / args.seconds,
        "us_per_event": busy / n * 1e6,
        "raw_us_per_event": used / n * 1e6,
        "spread": float(min(held.values()) if held else 0),
    }


async def failover(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Two workers under load; SIGKILL one; time its sources' first result from the new owner."""
    server = EmbeddedServer(tmp / "nats-failover")
    url = await asyncio.to_thread(server.start)
    cfg = tmp / "routing.toml"
    routes = "".join(ROUTE.format(m=m) for m in MODS)
    cfg.write_text(CONFIG.format(partitions=args.partitions, lease=args.lease, routes=routes))
    workers = [await start_worker(cfg, url) for _ in range(2)]
    nc = await nats.connect(url)
    js = nc.jetstream()
    first_after: list[float] = []
    last_after: list[float] = []
    killed_at = 0.0
    theirs: set[str] = set()

    async def on_result(msg: Any) -> None:
        if killed_at and orjson.loads(msg.data)["source"] in theirs:
            now = time.monotonic() - killed_at
            if not first_after:
                first_after.append(now)
            last_after[:] = [now]

    await nc.subscribe(SOAK.results, cb=on_result)
    try:

        async def spread() -> bool:
            return len(set((await owners(js)).values())) == 2

        await until(spread, "two workers sharing the partitions")
        accepted: set[str] = set()
        producing = asyncio.create_task(
            produce(js, args.rate, args.sources, args.seconds, accepted, asyncio.Event())
        )
        await asyncio.sleep(args.seconds / 2)
        held = await owners(js)
        victim_name = sorted(set(held.values()))[0]
        parts = [p for p, w in held.items() if w == victim_name and p.isdigit()]
        theirs.update(
            s
            for s in (f"s{i}" for i in range(args.sources))
            if str(partition_of(s, args.partitions)) in parts
        )
        in_flight = 0
        for p in parts:
            info = await js.consumer_info("SOAK_IN", f"autoglm-engine-p{p}")
            in_flight += info.num_pending + info.num_ack_pending
        # which process is the victim: the worker name ends in its pid
        victim = next(w for w in workers if f"-{w.pid}-" in victim_name)
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        await producing
        await until(lambda: drained(js), "the survivor to finish the backlog")
        results = await read_stream(js, SOAK.results)
    finally:
        for w in workers:
            if w.returncode is None:
                w.send_signal(signal.SIGTERM)
                await asyncio.wait_for(w.wait(), 60)
        await nc.close()
        await asyncio.to_thread(server.stop)
    events = Counter(e for _, r in results for group in r["events"].values() for e in group)
    return {
        "partitions_moved": len(parts),
        "in_flight_at_kill": in_flight,
        "first_result_s": first_after[0] if first_after else None,
        "lost": len(accepted - set(events)),
        "duplicated": sum(n - 1 for n in events.values() if n > 1),
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=1500, help="events/s offered")
    ap.add_argument("--seconds", type=float, default=20.0, help="of load per measurement")
    ap.add_argument("--sources", type=int, default=200)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--lease", type=float, default=3.0, help="nats.lease_s")
    ap.add_argument("--workers", default="1,2,4", help="worker counts to measure")
    ap.add_argument("--no-failover", action="store_true")
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.rate} events/s for {args.seconds:g} s from {args.sources} sources over "
        f"{args.partitions} partitions, lease {args.lease:g} s"
    )
    with tempfile.TemporaryDirectory(prefix="autoglm-scale-") as tmp:
        base = None
        for k in (int(x) for x in args.workers.split(",")):
            r = await run_workers(k, args, Path(tmp))
            base = base or r["us_per_event"]
            print(
                f"workers {k}: {r['events']} events, CPU {r['cpu_s']:.1f} s (idle share "
                f"{r['idle_cpu_s']:.1f} s), {r['us_per_event']:.0f} µs CPU/event "
                f"(raw {r['raw_us_per_event']:.0f}), ratio to 1 worker {r['us_per_event'] / base:.2f}, "
                f"fewest partitions on a worker {r['spread']:.0f}",
                flush=True,
            )
        if not args.no_failover:
            f = await failover(args, Path(tmp))
            print(
                f"failover: SIGKILL of a worker holding {f['partitions_moved']} partitions with "
                f"{f['in_flight_at_kill']} events pending or unacked; first result of its sources "
                f"from the new owner {f['first_result_s']:.2f} s after the kill; "
                f"lost {f['lost']}, duplicated {f['duplicated']}"
            )
            return 1 if f["lost"] or f["duplicated"] else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
