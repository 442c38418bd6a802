"""The monitor over HTTP: a real engine on a real nats-server, the monitor's
uvicorn on a free port, and httpx reading its event stream as a browser would."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import cv2
import httpx
import nats
import numpy as np
import orjson
import pytest

from engine.monitor.server import Monitor
from engine.runtime.engine import Engine
from tests.conftest import make_config, send

JPEG = cv2.imencode(".jpg", np.full((24, 32, 3), 90, np.uint8))[1].tobytes()


@contextlib.asynccontextmanager
async def running_monitor(nats_url: str, prefix: str, port: int = 0) -> AsyncIterator[Monitor]:
    nc = await nats.connect(nats_url)
    monitor = Monitor(nc, prefix, port=port, interval=0.2)
    ready = asyncio.Event()
    task = asyncio.create_task(monitor.serve(lambda url: ready.set()))
    try:
        await asyncio.wait_for(ready.wait(), 20)
        yield monitor
    finally:
        monitor.stop()
        await asyncio.wait_for(task, 20)
        await nc.close()


async def next_update(
    lines: AsyncIterator[str], done: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """Read ``update`` events until one satisfies ``done``."""
    try:
        async with asyncio.timeout(20):
            async for line in lines:
                if line.startswith("data: "):
                    update: dict[str, Any] = orjson.loads(line[6:])
                    if done(update):
                        return update
    except TimeoutError:
        pass
    raise AssertionError(f"the event stream never showed {what}")


def card(update: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in update["cards"] if c["name"] == name), None)


async def test_the_event_stream_follows_an_engine_and_the_page_is_read_only(
    nats_url: str, prefix: str, nc: Any
) -> None:
    engine = Engine(make_config(prefix))
    await engine.start(nats_url)
    try:
        async with (
            running_monitor(nats_url, prefix) as monitor,
            httpx.AsyncClient(base_url=monitor.url) as http,
        ):
            async with http.stream("GET", "/events", timeout=30) as events:
                assert events.headers["content-type"].startswith("text/event-stream")
                lines = events.aiter_lines()
                first = await next_update(lines, lambda u: True, "a first update")
                assert first["full"] and first["cards"] == []
                await next_update(
                    lines, lambda u: [e["prefix"] for e in u["overview"]["engines"]] == [prefix], "the engine"
                )
                ts = time.time_ns()
                await send(nc, prefix, "cam0", "image", JPEG, ts, event_id="cam0-i0")
                await send(nc, prefix, "cam0", "text", b"hello", ts, event_id="cam0-t0")
                await nc.flush()
                update = await next_update(
                    lines,
                    lambda u: (c := card(u, "cam0")) is not None and c["results"] >= 1 and c["frame"] >= 1,
                    "cam0's card with a result and a frame",
                )
                assert not update["full"]  # only what changed
                await nc.publish(f"{prefix}.in.cam0.image", b"no headers")  # missing_timestamp
                await nc.flush()
                update = await next_update(
                    lines,
                    lambda u: (
                        "missing_timestamp" in u["rejections"]["counts"]
                        and u["overview"]["totals"].get("rejected", 0) >= 1
                    ),
                    "the rejection, in the panel and the engine's totals",
                )
                [last] = update["rejections"]["last"]
                assert last["source"] == "cam0" and "AutoGLM-Timestamp" in last["message"]
                await next_update(
                    lines, lambda u: u["overview"]["rates"]["series"].get("in:image"), "an events/s line"
                )
            frame = await http.get("/frame/cam0")
            assert frame.headers["content-type"] == "image/jpeg" and frame.content == JPEG
            timeline = (await http.get("/api/source/cam0")).json()
            assert timeline["windows"][0]["events"] == {"image": 1, "text": 1}
            assert (await http.get("/api/source/nobody")).status_code == 404
            assert (await http.get("/frame/nobody")).status_code == 404
            page = await http.get("/")
            assert "<title>AutoGLM monitor</title>" in page.text
            assert (await http.get("/static/monitor.js")).status_code == 200
            for path in ("/", "/events", "/api/state", "/api/source/cam0"):  # read-only
                assert (await http.post(path)).status_code == 405
    finally:
        await engine.stop()


async def test_a_restarted_monitor_serves_the_stream_again_on_its_port(nats_url: str, prefix: str) -> None:
    """A browser's EventSource reconnects to the same URL: after a restart the
    stream is there again and starts with the full state."""
    async with running_monitor(nats_url, prefix) as monitor, httpx.AsyncClient(base_url=monitor.url) as http:
        url = monitor.url
        port = int(url.rsplit(":", 1)[1].strip("/"))
        async with http.stream("GET", "/events", timeout=30) as events:
            lines = events.aiter_lines()
            await next_update(lines, lambda u: True, "a first update")
            monitor.stop()  # an open stream ends (the browser reconnects), it is not cut off
            async with asyncio.timeout(20):
                rest = [line async for line in lines]
            assert all(not line.startswith("data: ") or '"seq"' in line for line in rest)
    async with httpx.AsyncClient(base_url=url) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/healthz")
        async with running_monitor(nats_url, prefix, port=port) as again:
            assert again.url == url
            async with http.stream("GET", "/events", timeout=30) as events:
                update = await next_update(events.aiter_lines(), lambda u: True, "a first update")
                assert update["full"]
