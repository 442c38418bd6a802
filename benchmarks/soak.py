"""Soak: minutes of a multi-source stream with an engine worker SIGKILLed every minute.

    .venv/bin/python benchmarks/soak.py [--minutes 5] [--rate 1000] [--sources 20] [--kill-every 60]
                                        [--workers 2] [--partitions 4]

One file-backed JetStream nats-server (the embedded binary) and ``--workers``
``autoglm run`` processes with the same config (``nats.partitions =
--partitions``), in durable mode, with passthrough processors on all three
modalities. A producer publishes ``--rate`` events/s from ``--sources``
sources with JetStream PubAcks (an event counts as published once the server
has stored it). Every ``--kill-every`` seconds one worker (in turn) gets
SIGKILL and is started again two seconds later: its partitions move to the
others meanwhile, and some move back when it returns. At the end the
producer stops, the workers drain the input stream and exit on SIGTERM, and
the results stream ``SOAK_OUT`` is read the way a consumer would:

- in: events the server acknowledged;
- results out: result messages stored, and the events they hold;
- lost: acknowledged events in no result and no DLQ record;
- duplicated: result ids stored twice, and events found in two results;
- windows split: one source's window in two results;
- peak RSS of every engine incarnation (VmHWM).

Exit status 1 when anything was lost or duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
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

from engine.contracts.subjects import Subjects
from engine.runtime.server import EmbeddedServer
from engine.wire.codec import encode_headers

ROOT = Path(__file__).resolve().parent.parent
SOAK = Subjects("soak")  # the prefix CONFIG sets
CONFIG = """
[nats]
subject_prefix = "{prefix}"
ack_wait_s = 10
max_ack_pending = 50000
partitions = {partitions}
lease_s = 2
[aligner]
window_ms = 200
allowed_lateness_ms = 50
idle_timeout_ms = 1000
{routes}
"""
ROUTE = (
    '[[routes]]\nmodality = "{m}"\nprocessor = "passthrough"\n'
    "[routes.batch]\nmax_batch_size = 256\nmax_wait_ms = 2\n"
)
MODS = ("image", "audio", "text")


def peak_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Engine:
    """``autoglm run`` as a child process, restartable, with its peak RSS watched."""

    def __init__(self, cfg: Path, url: str, log: Path) -> None:
        self.cfg, self.url = cfg, url
        #: Each incarnation's stderr, appended (kept when the soak fails).
        self.log = log.open("ab")
        self.proc: asyncio.subprocess.Process | None = None
        self.peak_kib = 0
        self.starts = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.tools.cli", "run", "--config", str(self.cfg),
            "--nats-url", self.url,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=self.log,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
        if b"engine running" not in line:
            raise RuntimeError(f"engine did not start: {line!r}")
        self.starts += 1

    def sample(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.peak_kib = max(self.peak_kib, peak_rss_kib(self.proc.pid))

    async def kill(self) -> None:
        assert self.proc is not None
        self.sample()
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> int:
        assert self.proc is not None
        self.sample()
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 120)


async def produce(
    js: Any, rate: int, sources: int, seconds: float, accepted: set[str], stop: asyncio.Event
) -> int:
    """Paced JetStream publishes; an event id lands in ``accepted`` once stored."""
    failed = 0
    tick = 0.05
    per_tick = max(1, int(rate * tick))
    t0 = time.monotonic()
    n = 0
    while not stop.is_set() and time.monotonic() - t0 < seconds:
        now_ns = time.time_ns()
        batch = []
        for _ in range(per_tick):
            src = f"s{n % sources}"
            mod = MODS[n % 3]
            eid = f"e{n}"
            hdrs = encode_headers(
                now_ns,
                "text/plain" if mod == "text" else "image/jpeg" if mod == "image" else "audio/wav",
                event_id=eid,
            )
            batch.append((eid, js.publish(SOAK.input(src, mod), b"x" * 256, headers=hdrs, timeout=5)))
            n += 1
        results = await asyncio.gather(*(p for _, p in batch), return_exceptions=True)
        for (eid, _), res in zip(batch, results, strict=True):
            if isinstance(res, BaseException):
                failed += 1  # never stored: not counted as published
            else:
                accepted.add(eid)
        due = t0 + (n / per_tick) * tick
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    return failed


async def read_stream(js: Any, subject: str) -> list[tuple[str, dict[str, Any]]]:
    sub = await js.subscribe(subject, ordered_consumer=True)
    out = []
    while True:
        try:
            msg = await sub.next_msg(timeout=2.0)
        except Exception:  # nats TimeoutError: read to the end
            break
        out.append((msg.headers.get("Nats-Msg-Id", "") if msg.headers else "", orjson.loads(msg.data)))
    await sub.unsubscribe()
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=1000, help="events/s offered")
    ap.add_argument("--sources", type=int, default=20)
    ap.add_argument("--kill-every", type=float, default=60.0, help="seconds between SIGKILLs")
    ap.add_argument("--workers", type=int, default=2, help="engine processes (one is killed at a time)")
    ap.add_argument("--partitions", type=int, default=4, help="nats.partitions")
    args = ap.parse_args()
    seconds = args.minutes * 60
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.minutes:g} min at {args.rate} events/s from {args.sources} sources, "
        f"{args.workers} workers over {args.partitions} partitions, one SIGKILLed every {args.kill_every:g} s"
    )
    with tempfile.TemporaryDirectory(prefix="autoglm-soak-") as tmp:
        server = EmbeddedServer(Path(tmp) / "nats")
        url = await asyncio.to_thread(server.start)
        cfg = Path(tmp) / "routing.toml"
        routes = "".join(ROUTE.format(m=m) for m in MODS)
        cfg.write_text(CONFIG.format(prefix=SOAK.prefix, partitions=args.partitions, routes=routes))
        logs = Path(tempfile.mkdtemp(prefix="autoglm-soak-logs-"))
        engines = [Engine(cfg, url, logs / f"worker{i + 1}.log") for i in range(args.workers)]
        for engine in engines:
            await engine.start()
        nc = await nats.connect(url)
        js = nc.jetstream()
        accepted: set[str] = set()
        stop = asyncio.Event()
        producer = asyncio.create_task(produce(js, args.rate, args.sources, seconds, accepted, stop))
        t0 = time.monotonic()
        kills = 0
        while not producer.done():
            await asyncio.sleep(1.0)
            for engine in engines:
                engine.sample()
            if time.monotonic() - t0 >= (kills + 1) * args.kill_every and time.monotonic() - t0 < seconds - 5:
                victim = engines[kills % len(engines)]
                await victim.kill()
                kills += 1
                which = engines.index(victim) + 1
                print(
                    f"[{time.monotonic() - t0:6.1f}s] SIGKILL #{kills} (worker {which}); "
                    f"{len(accepted)} events stored so far",
                    flush=True,
                )
                await asyncio.sleep(2.0)
                await victim.start()
        failed = await producer
        # Let the workers catch up: the input stream is a work queue, empty once
        # every accepted event's result or DLQ record is stored and acked.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for engine in engines:
                engine.sample()
            if not (await js.stream_info("SOAK_IN")).state.messages:
                break
            await asyncio.sleep(1.0)
        codes = [await engine.stop() for engine in engines]
        results = await read_stream(js, SOAK.results)
        dlq = await read_stream(js, SOAK.rejections)
        await nc.close()
        await asyncio.to_thread(server.stop)
    ids = Counter(msg_id for msg_id, _ in results)
    events = Counter(e for _, r in results for group in r["events"].values() for e in group)
    rejected = {r.get("event_id") for _, r in dlq}
    lost = accepted - set(events) - rejected
    dup_results = sum(n - 1 for n in ids.values() if n > 1)
    dup_events = sum(n - 1 for n in events.values() if n > 1)
    windows = Counter((r["source"], r["window"]["start_ns"]) for _, r in results)
    split = sum(n - 1 for n in windows.values() if n > 1)
    print(
        f"in {len(accepted)} events (stored by the server; {failed} publishes failed "
        f"and were not stored)\nresults out {len(results)} messages holding {sum(events.values())} events; "
        f"DLQ {len(dlq)} ({Counter(r['reason'] for _, r in dlq).most_common()})\n"
        f"lost {len(lost)}, duplicated results {dup_results}, duplicated events {dup_events}, "
        f"windows split {split}\n"
        f"workers: {sum(e.starts for e in engines)} starts, {kills} SIGKILLs, last exits {codes}, "
        f"peak RSS {max(e.peak_kib for e in engines) / 1024:.0f} MiB"
    )
    failed_run = bool(lost or dup_results or dup_events or split or any(codes))
    print(f"workers' stderr: {logs}" if failed_run else "", end="\n" if failed_run else "")
    if not failed_run:
        shutil.rmtree(logs, ignore_errors=True)
    return 1 if failed_run else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
