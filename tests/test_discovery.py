"""Standard NATS service discovery finds the engine and reads its stats."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson

from engine.runtime.engine import Engine
from tests.conftest import collect, make_config, send, stats_when


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
