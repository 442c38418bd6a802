"""Sources partitioned over workers: leases, handovers and failover, over a real server."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.js.api import RetentionPolicy, StreamConfig, SubjectTransform

from engine.contracts.errors import ConfigError
from engine.contracts.subjects import Subjects, partition_of
from engine.runtime.engine import Engine
from engine.transport.partitions import assignment, keys
from tests.conftest import collect, eventually, make_config, send, spawn_engine, stored, until

MS = 1_000_000
SOURCES = [f"cam{i}" for i in range(60)]


async def test_partition_of_puts_a_source_where_the_server_does(nc: Any, prefix: str) -> None:
    js = nc.jetstream()
    subjects = Subjects(prefix)
    src, dest = subjects.partition_transform(7)
    await js.add_stream(
        StreamConfig(
            name=f"{prefix}_P",
            subjects=[subjects.inputs],
            retention=RetentionPolicy.WORK_QUEUE,
            subject_transform=SubjectTransform(src=src, dest=dest),
        )
    )
    for source in SOURCES:
        await js.publish(subjects.input(source, "text"), b"x")
    for source in SOURCES:
        msg = await js.get_msg(f"{prefix}_P", seq=1, next=True, subject=f"{prefix}.part.*.{source}.text")
        assert msg.subject == f"{prefix}.part.{partition_of(source, 7)}.{source}.text"
        assert subjects.parse_input(msg.subject).source == source
    assert len({partition_of(s, 7) for s in SOURCES}) == 7  # 60 sources reach every partition


def test_the_assignment_is_even_and_a_join_moves_only_a_share() -> None:
    slots = [str(p) for p in range(64)]
    two = assignment(slots, ["a", "b"])
    three = assignment(slots, ["a", "b", "c"])
    assert sorted(Counter(two.values()).values()) == [32, 32]
    assert sorted(Counter(three.values()).values()) == [21, 21, 22]
    moved = [s for s in slots if two[s] != three[s]]
    assert len(moved) < 32 and sum(three[s] == "c" for s in moved) >= 21
    for n in range(1, 8):  # five slots: nobody is ever left without one
        members = [f"w{i}" for i in range(n)]
        loads = Counter(assignment(["0", "1", "2", "3", "rest"], members).values())
        assert sum(loads.values()) == 5 and (n > 5 or len(loads) == n)
        assert max(loads.values()) - min(loads.values()) <= 1
    assert assignment(slots, []) == {}


def config_text(prefix: str, partitions: int = 4) -> str:
    return (
        f'[nats]\nsubject_prefix = "{prefix}"\ndurable = true\nack_wait_s = 5\n'
        f"partitions = {partitions}\nlease_s = 1.0\n"
        "[aligner]\nwindow_ms = 100\nallowed_lateness_ms = 0\nidle_timeout_ms = 400\n"
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )


async def owners(nc: Any, prefix: str) -> dict[str, str]:
    """Partition -> the worker whose lease holds it, as the bucket says."""
    kv = await nc.jetstream().key_value(f"{prefix.upper()}_WORKERS")
    out = {}
    for key in await keys(kv, "p.*"):
        try:
            entry = await kv.get(key)
        except Exception:  # expired between the listing and the read
            continue
        if entry.value:
            out[key[2:]] = orjson.loads(entry.value)["worker"]
    return out


def check_exactly_once(results: list[tuple[dict[str, str], Any]], sent: set[str], logs: list[str]) -> None:
    ids = [h["Nats-Msg-Id"] for h, _ in results]
    assert len(ids) == len(set(ids)), "a consumer of the results stream saw one result twice"
    fused = [e for _, r in results for group in r["events"].values() for e in group]
    twice = [e for e, n in Counter(fused).items() if n > 1]
    assert not twice, f"events in two results: {twice[:10]}"
    assert set(fused) == sent, f"lost {sorted(sent - set(fused))[:10]}; stderr: {logs}"
    windows = Counter((r["source"], r["window"]["start_ns"]) for _, r in results)
    split = [w for w, n in windows.items() if n > 1]
    assert not split, f"windows split across results: {split[:10]}"


async def all_stored(nc: Any, prefix: str, sent: set[str]) -> list[tuple[dict[str, str], Any]]:
    async def holding() -> list[tuple[dict[str, str], Any]] | None:
        results = await stored(nc, f"{prefix}.out.>")
        fused = {e for _, r in results for group in r["events"].values() for e in group}
        return results if fused >= sent else None

    try:
        got: list[tuple[dict[str, str], Any]] = await eventually(holding, f"{len(sent)} events stored", 60)
    except AssertionError:
        got = await stored(nc, f"{prefix}.out.>")
    return got


async def publish_round(nc: Any, prefix: str, i: int, base: int, sent: set[str]) -> None:
    for source in SOURCES:
        eid = f"{source}-{i}"
        sent.add(eid)
        await send(nc, prefix, source, "text", b"e", base + i * 20 * MS, event_id=eid)


async def test_a_worker_joining_mid_stream_takes_its_share_and_splits_no_window(
    nc: Any, nats_url: str, prefix: str
) -> None:
    cfg = make_config(
        prefix,
        nats={"subject_prefix": prefix, "durable": True, "partitions": 4, "lease_s": 1.0},
        aligner={"window_ms": 100, "allowed_lateness_ms": 0, "idle_timeout_ms": 400},
    )
    first, second = Engine(cfg), Engine(cfg)
    await first.start(nats_url)
    assert first.transport is not None and len(first.transport.state().partitions) == 5  # 4 + the rest
    sent: set[str] = set()
    base = time.time_ns()
    try:
        for i in range(40):
            await publish_round(nc, prefix, i, base, sent)
            if i == 10:
                await second.start(nats_url)
            if i > 10 and second.transport is not None and not second.transport.state().partitions:
                await nc.flush()  # pacing: the stream goes on while the handover happens
            await asyncio.sleep(0.01)  # pacing, not synchronisation: the stream spans wall time
        await until(
            lambda: second.transport is not None and bool(second.transport.state().partitions),
            "the second worker to own partitions",
        )
        for i in range(40, 60):  # and after it
            await publish_round(nc, prefix, i, base, sent)
            await asyncio.sleep(0.01)  # pacing, not synchronisation: the stream spans wall time
        await nc.flush()
        results = await all_stored(nc, prefix, sent)
        check_exactly_once(results, sent, [])
        a, b = first.transport.state(), second.transport.state()
        assert set(a.partitions) | set(b.partitions) == {"0", "1", "2", "3", "rest"}
        assert not set(a.partitions) & set(b.partitions)
        assert a.moves >= 6 and b.moves >= 1  # 5 taken, at least 1 given; b took what a gave
        assert sorted(a.workers) == sorted([a.worker, b.worker])
        # a handover ends the giver's fetch loops on purpose: not a failure
        assert first.supervisor.failure is None and second.supervisor.failure is None
    finally:
        await second.stop()
        await first.stop()


async def test_sigkill_of_a_worker_moves_its_partitions_and_loses_nothing(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(config_text(prefix))
    workers = [await spawn_engine("--config", str(cfg), "--nats-url", nats_url) for _ in range(2)]
    logs: list[str] = []

    async def spread() -> bool:
        held = await owners(nc, prefix)
        return len(held) == 5 and len(set(held.values())) == 2

    await eventually(spread, "two workers sharing the partitions", 30)
    sent: set[str] = set()
    base = time.time_ns()
    victim = workers[0]
    for i in range(60):
        await publish_round(nc, prefix, i, base, sent)
        if i == 30:  # mid-stream, with windows open on both
            victim.send_signal(signal.SIGKILL)
            _, err = await asyncio.wait_for(victim.communicate(), 30)
            logs.append(err.decode())
        await asyncio.sleep(0.01)  # pacing, not synchronisation: the stream spans wall time
    await nc.flush()

    async def one_owner() -> bool:
        held = await owners(nc, prefix)
        return len(held) == 5 and len(set(held.values())) == 1

    await eventually(one_owner, "the survivor owning every partition", 30)
    results = await all_stored(nc, prefix, sent)
    survivor = workers[1]
    survivor.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(survivor.communicate(), 30)
    logs.append(err.decode())
    assert survivor.returncode == 0, logs
    check_exactly_once(results, sent, logs)


def core_config(prefix: str, tmp_path: Path) -> Any:
    """Core mode over four partitions on an embedded server of the test's own."""
    return make_config(
        prefix,
        nats={
            "subject_prefix": prefix,
            "durable": False,
            "partitions": 4,
            "lease_s": 1.0,
            "data_dir": str(tmp_path / "store"),
        },
        aligner={"window_ms": 100, "allowed_lateness_ms": 0, "idle_timeout_ms": 300},
    )


async def test_core_mode_workers_share_the_partitions_of_the_servers_mapping(
    tmp_path: Path, prefix: str
) -> None:
    """Core NATS: the embedded server maps inputs to partitions; two workers
    subscribe to what they own, and each event is in one result."""
    cfg = core_config(prefix, tmp_path)
    first = Engine(cfg)
    url = await first.start()  # the embedded server, started with the mapping
    second = Engine(cfg)
    client = await nats.connect(url)
    try:
        await second.start(url)
        assert first.transport is not None and second.transport is not None
        both = (first.transport, second.transport)
        await until(lambda: all(t.state().partitions for t in both), "both workers to own partitions")
        await until(
            lambda: sorted(p for t in both for p in t.state().partitions) == ["0", "1", "2", "3", "rest"],
            "every partition owned once",
        )
        out = await collect(client, f"{prefix}.out.>")
        sent: set[str] = set()
        base = time.time_ns()
        for i in range(5):
            await publish_round(client, prefix, i, base, sent)
        await client.flush()
        await out.wait_events(sent, timeout=30)
        fused = [e for _, _, r in out.items for group in r["events"].values() for e in group]
        assert sorted(fused) == sorted(sent)
        assert {r["source"] for _, _, r in out.items} == set(SOURCES)
    finally:
        await client.close()
        await second.stop()
        await first.stop()


async def test_core_partitions_need_jetstream_for_their_leases(tmp_path: Path, prefix: str) -> None:
    from engine.runtime.server import EmbeddedServer

    with EmbeddedServer(tmp_path, jetstream=False) as server:
        cfg = make_config(prefix, nats={"subject_prefix": prefix, "durable": False, "partitions": 2})
        with pytest.raises(ConfigError, match=r"nats\.partitions = 2: workers own partitions by lease"):
            await Engine(cfg).start(server.url)


async def test_three_workers_over_sixty_sources_put_every_event_in_one_result(
    nc: Any, nats_url: str, prefix: str
) -> None:
    cfg = make_config(
        prefix,
        nats={"subject_prefix": prefix, "durable": True, "partitions": 6, "lease_s": 1.0},
        aligner={"window_ms": 100, "allowed_lateness_ms": 0, "idle_timeout_ms": 400},
    )
    engines = [Engine(cfg) for _ in range(3)]
    for engine in engines:
        await engine.start(nats_url)
    try:
        transports = [e.transport for e in engines]
        assert all(t is not None for t in transports)

        def spread() -> bool:
            owned = [t.state().partitions for t in transports if t is not None]
            return all(len(p) >= 2 for p in owned) and sum(map(len, owned)) == 7  # 6 + the rest

        await until(spread, "seven partitions spread over three workers, two or three each")
        sent: set[str] = set()
        base = time.time_ns()
        for i in range(30):
            await publish_round(nc, prefix, i, base, sent)
            await asyncio.sleep(0.01)  # pacing, not synchronisation: the stream spans wall time
        await nc.flush()
        results = await all_stored(nc, prefix, sent)
        check_exactly_once(results, sent, [])
        for engine in engines:
            assert engine.supervisor.failure is None
            assert engine.pipeline.stats.results > 0  # each worker fused its own sources
    finally:
        for engine in engines:
            await engine.stop()


async def test_events_of_a_partition_nobody_has_taken_yet_wait_for_its_owner(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """On a work-queue stream the recording mirror's own consumer takes what no
    consumer's filter covers (nats-server 2.15). Every partition's consumer is
    made at setup, so events for a partition whose owner has not taken it yet
    (here: a worker that has announced itself and never takes anything) stay
    in the queue for it."""
    from nats.js.api import KeyValueConfig

    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket=f"{prefix.upper()}_WORKERS", ttl=5.0))
    cfg = make_config(
        prefix,
        nats={"subject_prefix": prefix, "durable": True, "partitions": 4, "lease_s": 5.0},
        aligner={"window_ms": 100, "allowed_lateness_ms": 0, "idle_timeout_ms": 300},
    )
    await kv.put("w.ghost", b"{}")  # alive for 5 s, owed some partitions, takes none
    engine = Engine(cfg)
    await engine.start(nats_url)
    try:
        assert engine.transport is not None
        mine = set(engine.transport.state().partitions)
        assert mine and len(mine) < 5
        sent: set[str] = set()
        await publish_round(nc, prefix, 0, time.time_ns(), sent)
        await nc.flush()
        theirs = [s for s in SOURCES if str(partition_of(s, 4)) not in mine]

        async def recorded() -> bool:
            return bool((await js.stream_info(f"{prefix.upper()}_REC")).state.messages >= len(SOURCES))

        await eventually(recorded, "the recording to hold every event", 10)
        waiting = sum(
            (
                (
                    await js.stream_info(f"{prefix.upper()}_IN", subjects_filter=f"{prefix}.part.>")
                ).state.subjects
                or {}
            ).values()
        )
        assert waiting >= len(theirs), "events of the ghost's partitions left the queue unprocessed"
        await kv.delete("w.ghost")  # gone: its partitions come to the engine
        results = await all_stored(nc, prefix, sent)
        check_exactly_once(results, sent, [])
    finally:
        await engine.stop()
