"""Durable intake over a real JetStream server, including a SIGKILL mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.contracts.errors import TransportError
from engine.contracts.plugins import ProcessorSpec
from engine.contracts.types import Features, InputEvent, Modality
from engine.runtime.engine import Engine
from processors.params import PassthroughParams
from tests.conftest import eventually, make_config, send, spawn_engine, stats_when, stored, until

ROOT = Path(__file__).resolve().parent.parent
MS = 1_000_000


async def start_engine(cfg: Path, url: str) -> asyncio.subprocess.Process:
    return await spawn_engine("--config", str(cfg), "--nats-url", url)


async def stored_results(nc: Any, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    """Every result the OUT stream kept: what a durable consumer would read."""
    return [(headers["Nats-Msg-Id"], body) for headers, body in await stored(nc, f"{prefix}.out.>")]


def fused_in(results: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [e for _, r in results for group in r["events"].values() for e in group]


async def wait_stored(nc: Any, prefix: str, sent: set[str], timeout: float) -> list[str]:
    """The events in the OUT stream once it holds every sent one (or as it is
    when time runs out: the caller's assertion then names what is missing)."""

    async def holding() -> list[str] | None:
        fused = fused_in(await stored_results(nc, prefix))
        return fused if set(fused) >= sent else None

    with contextlib.suppress(AssertionError):
        found: list[str] = await eventually(holding, f"{len(sent)} events stored", timeout)
        return found
    return fused_in(await stored_results(nc, prefix))


async def consumer_settled(nc: Any, prefix: str) -> Any:
    """The engine's consumer once nothing is pending or unacked (acks are asynchronous)."""
    js = nc.jetstream()

    async def settled() -> Any:
        info = await js.consumer_info(f"{prefix.upper()}_IN", "autoglm-engine")
        return info if info.num_ack_pending == 0 and info.num_pending == 0 else None

    return await eventually(settled, "every input acked")


async def test_durable_mode_is_the_default_on_jetstream(nc: Any, nats_url: str, prefix: str) -> None:
    engine = Engine(make_config(prefix))  # nats.durable unset: JetStream, since the server has it
    await engine.start(nats_url)
    await send(nc, prefix, "cam", "text", b"hello", time.time_ns(), event_id="h1")
    await nc.flush()
    assert await wait_stored(nc, prefix, {"h1"}, 20) == ["h1"]
    await consumer_settled(nc, prefix)  # acked after its result was stored
    stats = await stats_when(nc, prefix, lambda s: s["unacked"] == 0, "nothing held")
    assert stats["durable"] is True and stats["results"] == 1
    await engine.stop()
    [(msg_id, result)] = await stored_results(nc, prefix)
    assert result["events"] == {"text": ["h1"]} and msg_id.startswith("cam:")


async def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\ndurable = true\nack_wait_s = 2\n'
        "[aligner]\nwindow_ms = 200\nidle_timeout_ms = 500\n"
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    engine = await start_engine(cfg, nats_url)
    logs = []  # each engine's stderr, for the failure message
    sent: set[str] = set()
    base = time.time_ns()
    for i in range(300):
        if i == 150:  # half way: kill -9, keep publishing into the stream, start again
            engine.send_signal(signal.SIGKILL)
            _, err = await asyncio.wait_for(engine.communicate(), 30)
            logs.append(err.decode())
        for s in range(3):
            eid = f"s{s}-{i}"
            sent.add(eid)
            await send(nc, prefix, f"s{s}", "text", b"e", base + i * 10 * MS, event_id=eid)
        if i == 160:
            engine = await start_engine(cfg, nats_url)
        # Pacing, not synchronisation: the stream goes on over wall time, so the
        # kill lands while the engine holds events in open windows.
        await asyncio.sleep(0.005)
    await nc.flush()
    await wait_stored(nc, prefix, sent, 20)
    engine.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(engine.communicate(), 30)
    logs.append(err.decode())
    assert engine.returncode == 0, logs
    results = await stored_results(nc, prefix)
    ids = [msg_id for msg_id, _ in results]
    fused = fused_in(results)
    assert len(ids) == len(set(ids)), "a consumer saw the same result twice"
    assert len(fused) == len(set(fused)), "an event is in two stored results"
    if lost := sorted(sent - set(fused)):
        why = {r["event_id"]: r["reason"] for _, r in await stored(nc, f"{prefix}.dlq.>")}
        raise AssertionError(f"lost {len(lost)}: {lost[:10]}; DLQ records: {why}; engines' stderr: {logs}")
    assert set(fused) == sent


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
        f'[nats]\nsubject_prefix = "{prefix}"\ndurable = true\nack_wait_s = 5\n'
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
                await asyncio.sleep(0.5)  # the outage itself: clients fail to reconnect meanwhile
                server.start()
            for src in range(2):
                eid = f"s{src}-{i}"
                sent.add(eid)
                await store(js, f"{prefix}.in.s{src}.text", base + i * 10 * MS, eid)
            await asyncio.sleep(0.005)  # pacing: the stream spans wall time around the outage
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
        aligner = {"window_ms": 50, "idle_timeout_ms": 200}
        engine = Engine(make_config(prefix, nats={"durable": True}, glm=glm, aligner=aligner))
        await engine.start(nats_url)
        base = time.time_ns()
        for i in range(40):
            await send(nc, prefix, f"cam{i % 4}", "text", b"t", base + i * 20 * MS, event_id=f"e{i}")
        await nc.flush()
        sent = {f"e{i}" for i in range(40)}
        # Every window is stored (and its inputs acked) while the model still hangs:
        # intake never waited for it.
        assert set(await wait_stored(nc, prefix, sent, 20)) == sent
        stats = await stats_when(
            nc, prefix, lambda s: s["unacked"] == 0 and s["glm"]["queued"] == 0, "nothing held or queued"
        )
        assert stats["received"] == {"text": 40}
        await engine.stop()
    results = await stored_results(nc, prefix)
    assert sorted(fused_in(results)) == sorted(sent)  # each once
    assert all(r["answer"] is None and ("error" in r["glm"] or "skipped" in r["glm"]) for _, r in results)
    assert any(r["glm"].get("skipped") == "breaker_open" for _, r in results)


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

    async def retry(subject: str, payload: bytes, headers: dict[str, str], acks: Any) -> None:
        retried.append(subject)  # the awaited path; here it "succeeds"

    store = ResultStore(nc, on_stored, retry, timeout=1.0)
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


async def test_result_store_waits_for_room_and_retries_what_gets_no_pubAck_in_time(
    nc: Any, prefix: str
) -> None:
    """A subject someone listens on but no stream stores: no 'no responders',
    no PubAck either. Each record times out and is retried; past
    ``max_pending`` unconfirmed records, ``put`` waits for room."""
    from engine.transport.resultstore import ResultStore

    await nc.subscribe(f"{prefix}.silent")  # takes the records, answers nothing
    stored: list[Any] = []
    retried: list[bytes] = []

    async def on_stored(acks: Any) -> None:
        stored.extend(acks)

    async def retry(subject: str, payload: bytes, headers: dict[str, str], acks: Any) -> None:
        retried.append(payload)

    store = ResultStore(nc, on_stored, retry, timeout=0.2, max_pending=2)
    store.start()
    for i in range(5):
        await store.put(f"{prefix}.silent", str(i).encode(), {"Nats-Msg-Id": f"s{i}"}, (f"js{i}",))
    await store.drain()
    assert retried == [b"0", b"1", b"2", b"3", b"4"] and store.retried == 5
    assert stored == [f"js{i}" for i in range(5)]  # in order, each once
    assert store.waits >= 1 and store.pending == 0


async def test_a_stream_left_with_the_wrong_retention_refuses_the_start_and_says_why(
    nc: Any, nats_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An older version's input stream (limits retention) must not be used as a
    work queue; the start fails naming it, and undoes what it had started."""
    await nc.jetstream().add_stream(name=f"{prefix.upper()}_IN", subjects=[f"{prefix}.in.>"])
    engine = Engine(make_config(prefix, nats={"subject_prefix": prefix, "durable": True}))
    with pytest.raises(TransportError, match=r"has retention limits but the engine needs workqueue"):
        await engine.start(nats_url)
    assert not [r for r in caplog.records if r.levelname == "CRITICAL"], "a failed start is not a crash"
    assert engine.supervisor.failure is None
    # Nothing answers for the prefix: a second try (after the stream is fixed) is not refused.
    await nc.jetstream().delete_stream(f"{prefix.upper()}_IN")
    again = Engine(make_config(prefix, nats={"subject_prefix": prefix, "durable": True}))
    await again.start(nats_url)
    await again.stop()


# -- a window that cannot fuse, a record that cannot be published -----------------------------


class Ragged:
    """A processor whose embedding size follows its input (a buggy or hostile plugin)."""

    def __init__(self, modality: Modality) -> None:
        self.modality = modality

    def prepare(self, event: InputEvent) -> bytes:
        return event.payload

    def run(self, items: Sequence[bytes]) -> list[Features]:
        return [Features(self.modality, embedding=np.ones(len(b), np.float32)) for b in items]


def make_ragged(params: PassthroughParams, modality: Modality, device: str, dtype: str) -> Ragged:
    return Ragged(modality)


async def test_ragged_embeddings_in_one_window_lose_no_result_and_hold_no_input(
    use_processor: Any, nats_url: str, nc: Any, prefix: str
) -> None:
    use_processor(ProcessorSpec("test-ragged", None, PassthroughParams, "tests.test_durable:make_ragged"))
    batch = {"max_batch_size": 8, "max_wait_ms": 2}
    cfg = make_config(
        prefix,
        nats={"durable": True},
        routes=[{"modality": "text", "processor": "test-ragged", "batch": batch}],
    )
    engine = Engine(cfg)
    await engine.start(nats_url)
    try:
        t = time.time_ns() - 5 * 10**9
        t -= t % (100 * MS)  # one 100 ms window
        await send(nc, prefix, "good", "text", b"abc", t + 1, event_id="g1")
        await send(nc, prefix, "evil", "text", b"abcd", t + 2, event_id="e1")
        await send(nc, prefix, "evil", "text", b"abcdefgh", t + 3, event_id="e2")  # another size, same window

        async def both() -> dict[str, dict[str, Any]]:
            records = {r["source"]: r for _, r in await stored_results(nc, prefix)}
            return records if {"good", "evil"} <= set(records) else {}

        records = await eventually(both, "the results of both sources")
        assert records["good"]["events"] == {"text": ["g1"]}
        assert records["evil"]["events"] == {"text": ["e1", "e2"]}
        assert records["evil"]["features"]["text"]["embeddings_left_out"] == 1
        intake = next(iter(engine.transport.intakes.values()))
        await until(lambda: not intake.held, "every input acked")
        assert engine.pipeline.stats.emit_errors == 0
    finally:
        await engine.stop()


async def test_a_record_that_cannot_be_published_is_delivered_again_not_held_forever(
    nats_url: str, nc: Any, prefix: str
) -> None:
    engine = Engine(make_config(prefix, nats={"durable": True, "ack_wait_s": 1.0}))
    await engine.start(nats_url)
    publish = engine.transport.publish
    failed: list[str] = []

    async def once_down(out: Any) -> None:
        if out.kind == "result" and not failed:
            failed.append(out.subject)
            raise TransportError("the results stream is away")  # once: the next try is stored
        await publish(out)

    engine.transport.publish = once_down  # type: ignore[method-assign]
    degraded: list[str] = []
    degrade = engine.supervisor.degrade
    engine.supervisor.degrade = lambda why: (degraded.append(why), degrade(why))[1]  # type: ignore[method-assign]
    try:
        await send(nc, prefix, "cam", "text", b"hi", time.time_ns() - 10**9, event_id="x1")

        async def recorded() -> list[dict[str, Any]]:
            return [r for _, r in await stored(nc, f"{prefix}.dlq.>") if r["event_id"] == "x1"]

        # Delivered again into a window that was closed: it is too late now, and
        # says so in the DLQ (a new result would need the window back).
        [record] = await eventually(recorded, "a record of the input after its redelivery", 30)
        assert record["reason"] == "too_late"
        intake = next(iter(engine.transport.intakes.values()))
        await until(lambda: not intake.held, "the input acked")
        assert failed and engine.pipeline.stats.emit_errors == 1
        # Health said so while nothing could be published, and no longer once a record was.
        assert "publish_failing" in degraded and "publish_failing" not in engine.supervisor.report().get(
            "degraded", {}
        )
    finally:
        await engine.stop()
