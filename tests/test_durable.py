"""Durable intake over a real JetStream server, including a SIGKILL mid-stream."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from engine.runtime.engine import Engine
from tests.conftest import make_config, send, spawn_engine, stored

ROOT = Path(__file__).resolve().parent.parent
MS = 1_000_000


async def start_engine(cfg: Path, url: str) -> asyncio.subprocess.Process:
    return await spawn_engine("--config", str(cfg), "--nats-url", url)


async def stored_results(nc: Any, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    """Every result the OUT stream kept: what a durable consumer would read."""
    return [(headers["Nats-Msg-Id"], body) for headers, body in await stored(nc, f"{prefix}.out.>")]


async def wait_stored(nc: Any, prefix: str, sent: set[str], timeout: float) -> list[str]:
    """Poll the OUT stream until it holds every sent event (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        results = await stored_results(nc, prefix)
        fused = [e for _, r in results for group in r["events"].values() for e in group]
        if set(fused) >= sent or time.monotonic() > deadline:
            return fused
        await asyncio.sleep(0.5)


async def test_durable_mode_is_the_default_on_jetstream(nc: Any, nats_url: str, prefix: str) -> None:
    engine = Engine(make_config(prefix))
    await engine.start(nats_url)
    assert engine.transport is not None and engine.transport.durable
    await send(nc, prefix, "cam", "text", b"hello", time.time_ns(), event_id="h1")
    await nc.flush()
    await asyncio.sleep(1.0)
    assert engine.transport.acked == 1 and not engine.transport.held  # acked after its result was stored
    await engine.stop()
    [(msg_id, result)] = await stored_results(nc, prefix)
    assert result["events"] == {"text": ["h1"]} and msg_id.startswith("cam:")
    info = await nc.jetstream().consumer_info(f"{prefix.upper()}_IN", "autoglm-engine")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\nack_wait_s = 2\n'
        "[aligner]\nwindow_ms = 200\nidle_timeout_ms = 500\n"
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    engine = await start_engine(cfg, nats_url)
    sent: set[str] = set()
    base = time.time_ns()
    for i in range(300):
        if i == 150:  # half way: kill -9, keep publishing into the stream, start again
            engine.send_signal(signal.SIGKILL)
            await engine.wait()
        for s in range(3):
            eid = f"s{s}-{i}"
            sent.add(eid)
            await send(nc, prefix, f"s{s}", "text", b"e", base + i * 10 * MS, event_id=eid)
        if i == 160:
            engine = await start_engine(cfg, nats_url)
        await asyncio.sleep(0.005)
    await nc.flush()
    await wait_stored(nc, prefix, sent, 20)
    engine.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(engine.wait(), 30) == 0
    results = await stored_results(nc, prefix)
    ids = [msg_id for msg_id, _ in results]
    fused = [e for _, r in results for group in r["events"].values() for e in group]
    assert len(ids) == len(set(ids)), "a consumer saw the same result twice"
    assert len(fused) == len(set(fused)), "an event is in two stored results"
    assert set(fused) == sent, f"lost: {sorted(sent - set(fused))[:10]}"


async def store(js: Any, subject: str, ts: int, eid: str) -> None:
    """What a producer that must not lose events does: publish with a PubAck,
    and try again until the (restarting) server has stored it."""
    from engine.wire.codec import encode_headers

    for _ in range(200):
        try:
            await js.publish(subject, b"e", headers=encode_headers(ts, "text/plain", event_id=eid), timeout=1)
            return
        except Exception:  # reconnecting, or JetStream still recovering its store
            await asyncio.sleep(0.1)
    raise AssertionError(f"could not store {eid}")


async def test_nats_server_restart_mid_stream(tmp_path: Path, prefix: str) -> None:
    import socket

    import nats

    from engine.runtime.server import EmbeddedServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = EmbeddedServer(tmp_path / "js", port=port)
    url = server.start()
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\nack_wait_s = 5\n'
        # Quiet for longer than the outage: windows must not close on the
        # engine clock while the server is away (they would refuse the rest).
        "[aligner]\nwindow_ms = 200\nidle_timeout_ms = 5000\n"
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    engine = await start_engine(cfg, url)
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    sent: set[str] = set()
    base = time.time_ns()
    try:
        for i in range(200):
            if i == 100:  # the server goes away with its file store, and comes back
                await nc.flush()
                server.stop()
                await asyncio.sleep(0.5)
                server.start()
            for src in range(2):
                eid = f"s{src}-{i}"
                sent.add(eid)
                await store(js, f"{prefix}.in.s{src}.text", base + i * 10 * MS, eid)
            await asyncio.sleep(0.005)
        await nc.flush()
        fused = await wait_stored(nc, prefix, sent, 30)
        assert set(fused) == sent, f"lost: {sorted(sent - set(fused))[:10]}"
        assert len(fused) == len(set(fused))
        engine.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(engine.wait(), 30) == 0
    finally:
        if engine.returncode is None:
            engine.kill()
        await nc.close()
        server.stop()


async def test_a_hanging_glm_never_stops_ingestion_or_loses_results(
    nc: Any, nats_url: str, prefix: str
) -> None:
    from tests.chat_server import ChatServer

    async with ChatServer(lambda n, b: ("hang", None)) as srv:
        glm = {
            "backend": "openai", "base_url": srv.url, "model": "m", "trigger": "every", "retries": 0,
            "call_timeout_s": 0.3, "breaker_failures": 2, "breaker_cooldown_s": 60, "max_queue": 4,
        }  # fmt: skip
        engine = Engine(make_config(prefix, glm=glm, aligner={"window_ms": 50, "idle_timeout_ms": 200}))
        await engine.start(nats_url)
        base = time.time_ns()
        for i in range(40):
            await send(nc, prefix, f"cam{i % 4}", "text", b"t", base + i * 20 * MS, event_id=f"e{i}")
        await nc.flush()
        await asyncio.sleep(2.0)
        assert engine.stats.received["text"] == 40  # intake never waited for the model
        await engine.stop()
    results = await stored_results(nc, prefix)
    fused = {e for _, r in results for g in r["events"].values() for e in g}
    assert fused == {f"e{i}" for i in range(40)}
    assert all(r["answer"] is None and ("error" in r["glm"] or "skipped" in r["glm"]) for _, r in results)
    assert any(r["glm"].get("skipped") == "breaker_open" for _, r in results)
    assert engine.glm.queued == 0 and engine.transport is not None and not engine.transport.state().unacked


async def test_result_store_acks_after_the_pubacks_and_retries_what_was_not_stored(
    nc: Any, prefix: str
) -> None:
    from engine.transport.resultstore import ResultStore

    js = nc.jetstream()
    await js.add_stream(name=f"{prefix.upper()}_RS", subjects=[f"{prefix}.rs.>"])
    stored: list[Any] = []
    retried: list[str] = []

    async def on_stored(keys: list[Any]) -> None:
        stored.extend(keys)

    async def retry(subject: str, payload: bytes, headers: dict[str, str]) -> None:
        retried.append(subject)  # the awaited path; here it "succeeds"

    store = ResultStore(js, on_stored, retry, timeout=1.0)
    store.start()
    for i in range(50):
        await store.put(f"{prefix}.rs.a", b"r", {"Nats-Msg-Id": f"r{i}"}, [("a", f"e{i}")])
    # no stream takes this subject: the PubAck is a 'no responders' error -> retried, then acked
    await store.put(f"{prefix}.nostream", b"r", {"Nats-Msg-Id": "lost"}, [("b", "x")])
    await store.drain()
    assert stored[:50] == [("a", f"e{i}") for i in range(50)]  # in publish order
    assert stored[50:] == [("b", "x")] and retried == [f"{prefix}.nostream"] and store.retried == 1
    info = await js.stream_info(f"{prefix.upper()}_RS")
    assert info.state.messages == 50  # each stored once
