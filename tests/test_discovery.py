"""Standard NATS service discovery finds the engine and reads its stats."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson

from engine.contracts.subjects import partition_of
from engine.runtime.engine import Engine
from engine.transport.partitions import assignment
from tests.conftest import collect, make_config, send, stats_when, until

SLOTS = ("0", "1", "2", "3", "rest")


async def test_srv_ping_info_stats_health_and_config(nc: Any, nats_url: str, prefix: str) -> None:
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(make_config(prefix, nats={"durable": True}))
    await engine.start(nats_url)
    try:
        await send(nc, prefix, "cam", "text", b"x", time.time_ns(), content_type="video/mp4")
        await dlq.wait_for(1)  # counted before its record is published
        pings = []
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.PING.autoglm", b"", reply=inbox)
        # Every engine on this server answers, each once: gather them until
        # the answers stop (the end of a scatter-gather, not a wait for the engine).
        while True:
            try:
                pings.append(orjson.loads((await sub.next_msg(timeout=0.5)).data))
            except Exception:
                break
        mine = [p for p in pings if p["metadata"].get("subject_prefix") == prefix]
        assert len(mine) == 1 and mine[0]["name"] == "autoglm"
        sid = mine[0]["id"]
        info = orjson.loads((await nc.request(f"$SRV.INFO.autoglm.{sid}", b"", timeout=2)).data)
        assert {e["name"] for e in info["endpoints"]} == {"health", "config", "reload"}
        stats = orjson.loads((await nc.request(f"$SRV.STATS.autoglm.{sid}", b"", timeout=2)).data)
        data = stats["endpoints"][0]["data"]
        assert data["rejected"] == {"text:unsupported_content_type": 1}
        assert data["glm"]["breaker"] == "closed" and data["durable"] is True
        health = orjson.loads((await nc.request(f"{prefix}.svc.health", b"", timeout=2)).data)
        assert health["status"] == "ok" and health["durable"] is True
        config = orjson.loads((await nc.request(f"{prefix}.svc.config", b"", timeout=2)).data)
        assert (
            config["nats"]["subject_prefix"] == prefix and config["routes"][0]["processor"] == "passthrough"
        )
    finally:
        await engine.stop()


async def test_status_command_lists_running_engines(nc: Any, nats_url: str, prefix: str) -> None:
    engine = Engine(make_config(prefix))
    await engine.start(nats_url)
    try:
        await send(nc, prefix, "cam", "text", b"x", time.time_ns(), event_id="s1")
        await stats_when(nc, prefix, lambda s: s["received"] == {"text": 1}, "the event received")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.tools.cli", "status", "--once", "--nats-url", nats_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        info_proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.tools.cli", "status", "--info", "--nats-url", nats_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        info_out, _ = await asyncio.wait_for(info_proc.communicate(), 30)
    finally:
        await engine.stop()
    assert proc.returncode == 0, err.decode()
    infos = [orjson.loads(line) for line in info_out.decode().splitlines()]
    [mine] = [i for i in infos if i["metadata"].get("subject_prefix") == prefix]
    assert mine["type"] == "io.nats.micro.v1.info_response" and mine["id"]
    assert {e["name"] for e in mine["endpoints"]} == {"health", "config", "reload"}
    lines = out.decode().splitlines()
    assert lines[0].split()[:3] == ["engine", "prefix", "recv"]
    [row] = [line for line in lines if f" {prefix} " in f" {line} "]
    assert row.split()[2] == "1"  # received
    assert "text:passthrough" in row and "none" in row


async def test_status_shows_each_worker_with_its_partitions_lag_and_moves(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """Two engines on one prefix share four partitions (and the rest): the
    table has a row and a worker line for each, and says every partition is owned."""
    cfg = make_config(
        prefix,
        nats={"subject_prefix": prefix, "durable": True, "partitions": 4, "lease_s": 1.0},
        # windows that stay open: their events stay unacked, the lag of their partition
        aligner={"window_ms": 600_000, "allowed_lateness_ms": 0, "idle_timeout_ms": 600_000},
    )
    engines = [Engine(cfg), Engine(cfg)]
    for engine in engines:
        await engine.start(nats_url)
    try:
        states = [e.transport.state for e in engines if e.transport is not None]

        def settled() -> bool:  # every partition with its rightful owner, both seen as live
            now = [state() for state in states]
            members = sorted(s.worker for s in now)
            return all(
                sorted(s.workers) == members
                and set(s.partitions)
                == {p for p, w in assignment(list(SLOTS), members).items() if w == s.worker}
                for s in now
            )

        await until(settled, "the partitions spread over both workers")
        part = str(partition_of("cam7", 4))
        for i in range(3):
            await send(nc, prefix, "cam7", "text", b"x", time.time_ns(), event_id=f"lag{i}")
        owner = next(state for state in states if part in state().partitions)
        await until(lambda: dict(owner().lag).get(part) == 3, "three inputs held in cam7's partition")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.tools.cli", "status", "--once", "--nats-url", nats_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        now = [state() for state in states]
    finally:
        for engine in engines:
            await engine.stop()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    for s in now:
        [at] = [i for i, line in enumerate(lines) if line.startswith(f"  worker {s.worker} ")]
        assert f" {prefix} " in lines[at - 1]  # under its engine's row
        shown = lines[at].split("partitions ", 1)[1]
        assert shown == (
            ", ".join(f"{p} (lag {dict(s.lag)[p]})" for p in s.partitions) or "none (standing by)"
        )
        assert f"moves {s.moves} " in lines[at] and s.moves >= len(s.partitions)
    assert f"{part} (lag 3)" in out.decode()
    assert f"{prefix}: 2 workers answering; all 5 partitions owned" in lines
