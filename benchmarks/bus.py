"""The engine's own overhead on the bus, against raw nats-py on the same server.

    .venv/bin/python benchmarks/bus.py [--rate 8500] [--seconds 10] [--sources 1000]

One nats-server (the embedded binary), three runs on it:

1. baseline: a nats-py publisher and subscriber moving the same 1 KB text
   events — the most Python and NATS give on this machine (burst), and the
   latency of the same paced load the engine gets;
2. the engine (``autoglm run`` in its own process) with the ``passthrough``
   text processor, window mode, ``window_ms = 10``, no allowed lateness, GLM
   ``none`` (``include_prompt = false``: no prompt text in the results), in
   core mode (plain subscription) and in durable mode (JetStream stream, pull
   consumer, results stored with PubAcks): paced loads from ``--sources``
   sources at each ``--steps`` multiple of ``--rate``. ``--modes
   core,core+prompt`` measures what building the prompt costs.

The raw baseline is paced at the same offered loads, so the two can be drawn
on one chart (``--json`` writes every figure; ``benchmarks/plot.py`` draws it).
Latency is from the event's timestamp (set when it is published) to the
arrival of the result that holds it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
import orjson

from engine.contracts.subjects import Subjects
from engine.runtime.server import EmbeddedServer
from engine.tools.publish import sync_with_server
from engine.wire.codec import encode_headers

BODY = b"x" * 1024
ROOT = Path(__file__).resolve().parent.parent
BENCH = Subjects("bench")  # the prefix CONFIG sets

CONFIG = """
[nats]
subject_prefix = "{prefix}"
durable = {durable}
max_ack_pending = 200000
fetch_batch = 1000
record_max_bytes = {record}
[[routes]]
modality = "text"
processor = "passthrough"
[routes.batch]
max_batch_size = 512
max_wait_ms = 1
max_queue = 100000
[aligner]
window_ms = 10
allowed_lateness_ms = 0
idle_timeout_ms = {idle}
max_sources = 100000
[glm]
backend = "none"
include_prompt = {prompt}
template = "{{source}} {{text}}"
"""


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


async def paced(
    nc: Any, subject_of: Any, rate: int, seconds: float, sources: int, sent: dict[str, int], prefix: str = "e"
) -> float:
    """Publish ``rate`` events/s for ``seconds``, round robin over sources."""
    total = int(rate * seconds)
    start = time.perf_counter()
    i = 0
    while i < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while i < due:
            src = i % sources
            eid = f"{prefix}{i}"
            ts = time.time_ns()
            sent[eid] = ts
            await nc.publish(subject_of(src), BODY, headers=encode_headers(ts, "text/plain", event_id=eid))
            i += 1
        await asyncio.sleep(0.0005)
    await nc.flush()
    return time.perf_counter() - start


async def baseline(url: str, rates: list[int], seconds: float, burst: int) -> dict[str, Any]:
    pub, sub = await nats.connect(url), await nats.connect(url)
    lat: list[float] = []
    got = 0
    done = asyncio.Event()
    target = [0]

    async def on_msg(msg: Any) -> None:
        nonlocal got
        got += 1
        lat.append((time.time_ns() - int(msg.headers["AutoGLM-Timestamp"])) / 1e6)
        if got >= target[0]:
            done.set()

    await sub.subscribe("base.>", cb=on_msg, pending_msgs_limit=10_000_000, pending_bytes_limit=2**34)
    await sync_with_server(sub)
    # burst: the ceiling
    target[0] = burst
    t0 = time.perf_counter()
    for i in range(burst):
        await pub.publish("base.s.text", BODY, headers=encode_headers(time.time_ns(), "text/plain"))
        if i % 5000 == 0:
            await asyncio.sleep(0)
    await pub.flush()
    await asyncio.wait_for(done.wait(), 120)
    burst_rate = burst / (time.perf_counter() - t0)
    # paced: latency at each of the engine's loads
    steps = []
    for rate in rates:
        got, lat[:] = 0, []
        done.clear()
        target[0] = int(rate * seconds)
        took = await paced(pub, lambda s: f"base.s{s}.text", rate, seconds, 1000, {})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 60)
        steps.append({"offered": rate, "rate": got / took, "p50": pct(lat, 50), "p99": pct(lat, 99),
                      "p999": pct(lat, 99.9), "err": 1 - got / target[0]})  # fmt: skip
    await pub.close()
    await sub.close()
    return {"burst": burst_rate, "steps": steps}


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used: the cost of a step
    whatever else the box runs meanwhile, where rates and latencies are not."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def engine_run(
    url: str, rates: list[int], seconds: float, sources: int, idle: int, mode: str, server_pid: int
) -> list[dict[str, float]]:
    """Paced loads at each rate in turn against one ``autoglm run`` process.

    ``mode``: ``core`` or ``durable``, with ``+prompt`` to build the (unused)
    prompt of every result as ``include_prompt = true`` does; ``durable+norecord``
    turns off the replay recording (``record_max_bytes = 0``)."""
    cfg = Path(tempfile.mkdtemp()) / "bench.toml"
    durable, prompt = mode.startswith("durable"), mode.endswith("+prompt")
    record = 0 if "+norecord" in mode else 1024**3
    cfg.write_text(
        CONFIG.format(
            prefix=BENCH.prefix,
            idle=idle,
            durable=str(durable).lower(),
            prompt=str(prompt).lower(),
            record=record,
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.tools.cli", "run", "--config", str(cfg), "--nats-url", url,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    await asyncio.wait_for(proc.stdout.readline(), 60)
    nc = await nats.connect(url)
    sent: dict[str, int] = {}
    lat: list[float] = []
    fused: set[str] = set()
    rejected = [0]

    last = [0.0]
    all_in = asyncio.Event()

    async def on_out(msg: Any) -> None:
        now = time.time_ns()
        for eid in orjson.loads(msg.data)["events"].get("text", []):
            fused.add(eid)
            if eid in sent:
                lat.append((now - sent[eid]) / 1e6)
        last[0] = time.perf_counter()
        if len(fused) >= len(sent):
            all_in.set()

    async def on_dlq(msg: Any) -> None:
        rejected[0] += 1

    await nc.subscribe(BENCH.results, cb=on_out, pending_msgs_limit=10_000_000, pending_bytes_limit=2**34)
    await nc.subscribe(BENCH.rejections, cb=on_dlq)
    await sync_with_server(nc)
    results = []
    for step, rate in enumerate(rates):
        sent.clear()
        lat.clear()
        fused.clear()
        all_in.clear()
        start = time.perf_counter()
        cpu0 = (cpu_s(proc.pid), cpu_s(server_pid))
        await paced(
            nc,
            lambda s: BENCH.input(f"s{s}", "text"),
            rate,
            seconds,
            sources,
            sent,
            prefix=f"{mode}-r{step}-",
        )  # ids unique across runs: the stream dedups them
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), 30)
        ok = len(fused & sent.keys())
        cpu1 = (cpu_s(proc.pid), cpu_s(server_pid))
        # Sustained = results per second until the last one: a backlog drained
        # after the senders stopped does not count as keeping up. Less the
        # pipeline's own delay (the fastest event's latency: the window and
        # the idle timeout), which postpones the last result without any backlog.
        results.append(
            {"offered": rate, "rate": ok / (last[0] - start - min(lat, default=0) / 1000),
             "p50": pct(lat, 50), "p99": pct(lat, 99),
             "p999": pct(lat, 99.9), "err": 1 - ok / len(sent), "rejected": rejected[0],
             "engine_us": 1e6 * (cpu1[0] - cpu0[0]) / len(sent),
             "server_us": 1e6 * (cpu1[1] - cpu0[1]) / len(sent)}
        )  # fmt: skip
        await asyncio.sleep(0.5)
    await nc.close()
    proc.terminate()
    await proc.wait()
    return results


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=8500)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--sources", type=int, default=1000)
    ap.add_argument("--burst", type=int, default=100_000, help="messages for the raw nats-py ceiling")
    ap.add_argument("--steps", default="0.5,1,1.5,2", help="offered loads as multiples of --rate")
    ap.add_argument("--idle-ms", type=int, default=20, help="aligner idle_timeout_ms for the engine run")
    ap.add_argument(
        "--modes",
        default="core,durable",
        help="engine runs: core, durable (either +prompt), durable+norecord",
    )
    ap.add_argument("--json", type=Path, help="write every figure here (for benchmarks/plot.py)")
    args = ap.parse_args()
    rates = [int(args.rate * float(m)) for m in args.steps.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"load: 1 KB text events from {args.sources} sources, {args.seconds:g} s per step; "
          f"window 10 ms, lateness 0, idle {args.idle_ms} ms")  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedServer(tmp) as server:
        base = await baseline(server.url, rates, args.seconds, args.burst)
        for mode in modes:
            assert server.process is not None
            runs[mode] = await engine_run(
                server.url, rates, args.seconds, args.sources, args.idle_ms, mode, server.process.pid
            )
    head = (
        f"{'offered/s':>10}{'done/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'lost':>9}{'vs raw':>8}"
        f"{'engine':>9}{'server':>9}"
    )
    print(f"\nraw nats-py pub -> sub: ceiling {base['burst']:,.0f} msg/s (burst)")
    for name, steps in [("raw nats-py, paced", base["steps"])] + [
        (f"engine, {m} mode", runs[m]) for m in modes
    ]:
        print(f"\n{name:22}{head}")
        for r in steps:
            print(f"{'':22}{r['offered']:10,}{r['rate']:10,.0f}{r['p50']:9.1f}{r['p99']:9.1f}{r['p999']:10.1f}"
                  f"{100 * r['err']:8.3f}%{r['rate'] / base['burst']:8.1%}"
                  + (f"{r['engine_us']:7.0f}µs{r['server_us']:7.0f}µs" if "engine_us" in r else "")
                  )  # fmt: skip
    print("\n(engine, server: CPU time per event offered, of the engine process and of nats-server)")
    best: dict[str, float] = {}
    for mode in modes:
        at = next((r for r in runs[mode] if r["offered"] == args.rate), runs[mode][0])
        # The targets of issue 15: sustained (99.9 % of offered), p99 <= 60 ms, nothing lost.
        ok = at["rate"] >= args.rate * 0.999 and at["p99"] <= 60 and at["err"] == 0
        best[mode] = max((r["rate"] for r in runs[mode] if r["err"] <= 0.0001), default=0.0)
        print(f"\n{mode}: at {args.rate}/s (sustained >= 99.9%, p99 <= 60 ms, none lost): "
              f"{'met' if ok else 'NOT met'} (done {at['rate']:,.0f}/s, p99 {at['p99']:.1f} ms); best "
              f"sustained without loss {best[mode]:,.0f}/s = {best[mode] / base['burst']:.1%} of raw"
              )  # fmt: skip
    if best.get("core") and "durable" in best:
        print(f"durable ceiling / core ceiling: {best['durable'] / best['core']:.0%} (target 65%)")
    if args.json:
        args.json.write_text(orjson.dumps({"machine": platform.machine(), "cores": os.cpu_count(),
                                           "rate": args.rate, "raw_burst": base["burst"],
                                           "raw": base["steps"], **runs},
                                          option=orjson.OPT_INDENT_2).decode())  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
