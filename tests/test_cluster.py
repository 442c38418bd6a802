"""A 3-node NATS cluster: several server URLs, replicas, and a node killed mid-stream."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from engine.config.nats import redact_url, server_urls
from engine.runtime.engine import Engine
from engine.runtime.server import find_binary
from engine.transport.partitions import assignment
from engine.transport.streams import record_stream, slots, state_bucket, stream_names, workers_bucket
from engine.wire.codec import encode_headers
from tests.cluster import Cluster, nats_cluster, stream_leader
from tests.conftest import ROOT, make_config, stored, until
from tests.test_partitions import SOURCES, all_stored, check_exactly_once

MS = 1_000_000


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    """One cluster for the module (electing its meta leader takes seconds);
    a test that kills a node brings it back before it ends."""
    async with nats_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.mark.parametrize(
    ("url", "servers", "shown"),
    [
        ("nats://a:4222", ["nats://a:4222"], "nats://a:4222"),
        ("nats://a:4222, nats://b:4222,nats://c:4222", ["nats://a:4222", "nats://b:4222", "nats://c:4222"],
         "nats://a:4222,nats://b:4222,nats://c:4222"),
        ("a:4222,b:4222", ["a:4222", "b:4222"], "a:4222,b:4222"),
        ("nats://u:p@a:4222,tls://t0k@b:4443", ["nats://u:p@a:4222", "tls://t0k@b:4443"],
         "nats://***@a:4222,tls://***@b:4443"),
        # a password may hold ',' (and '@'): with user info, only ',<scheme>://' separates
        ("nats://u:p,w@x@a:4222,nats://b:4222", ["nats://u:p,w@x@a:4222", "nats://b:4222"],
         "nats://***@a:4222,nats://b:4222"),
        ("u:p,w@a:4222", ["u:p,w@a:4222"], "***@a:4222"),
    ],
)  # fmt: skip
def test_several_server_urls_are_split_and_each_redacted(url: str, servers: list[str], shown: str) -> None:
    assert server_urls(url) == servers
    assert redact_url(url) == shown


def durable_config(prefix: str, url: str | None = None, **nats_extra: Any) -> Any:
    return make_config(
        prefix,
        nats={"subject_prefix": prefix, "durable": True, "url": url, **nats_extra},
        aligner={"window_ms": 100, "allowed_lateness_ms": 0, "idle_timeout_ms": 400},
    )


async def replicas_of(js: Any, prefix: str, object_bucket: str) -> dict[str, int]:
    """Replicas of every stream and bucket an engine on ``prefix`` made."""
    cfg = durable_config(prefix).nats
    names = [
        *stream_names(cfg),
        record_stream(cfg),
        f"KV_{workers_bucket(cfg)}",
        f"KV_{state_bucket(cfg)}",
        f"OBJ_{object_bucket}",
    ]
    return {n: (await js.stream_info(n)).config.num_replicas for n in names}


async def test_a_lone_server_gets_one_replica_of_everything(nc: Any, nats_url: str, prefix: str) -> None:
    bucket = f"{prefix}-payloads"
    engine = Engine(durable_config(prefix, object_bucket=bucket))
    await engine.start(nats_url)
    try:
        assert set((await replicas_of(nc.jetstream(), prefix, bucket)).values()) == {1}
    finally:
        await engine.stop()


async def test_on_a_cluster_everything_gets_three_replicas_and_any_url_of_a_list_serves(
    cluster: Cluster, prefix: str
) -> None:
    """The engine and the tools are given every node, a dead one first: they
    connect to another; the engine counts the cluster and makes its streams
    and buckets with R3."""
    bucket = f"{prefix}-payloads"
    urls = ",".join(["nats://127.0.0.1:1", *cluster.urls])  # nothing listens on port 1
    engine = Engine(durable_config(prefix, object_bucket=bucket))
    await engine.start(urls)
    nc = await nats.connect(cluster.urls)
    try:
        replicas = await replicas_of(nc.jetstream(), prefix, bucket)
        assert set(replicas.values()) == {3}, replicas
        in_stream = stream_names(engine.config.nats)[0]
        info = await nc.jetstream().stream_info(in_stream)
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2  # and the leader
        status = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.tools.cli", "status", "--once", "--nats-url", urls,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(status.communicate(), 60)
        assert status.returncode == 0, err.decode()
        assert any(line.split()[1:2] == [prefix] for line in out.decode().splitlines()), out.decode()
    finally:
        await engine.stop()
        await nc.close()


def test_the_node_configs_in_the_docs_are_valid_for_nats_server(tmp_path: Path) -> None:
    """docs/cluster.md's three files, as ``nats-server -t`` (test the configuration) reads them."""
    blocks = re.findall(
        r"^#### (nats-\w\.conf)\n\n```conf\n(.*?)```", (ROOT / "docs" / "cluster.md").read_text(), re.S | re.M
    )
    assert [name for name, _ in blocks] == ["nats-a.conf", "nats-b.conf", "nats-c.conf"]
    for name, text in blocks:
        conf = tmp_path / name
        conf.write_text(text.replace("/var/lib/nats", str(tmp_path / name)))
        checked = subprocess.run([str(find_binary()), "-t", "-c", str(conf)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{name}: {checked.stderr}"
    names = [re.search(r"server_name: (\S+)", text).group(1) for _, text in blocks]  # type: ignore[union-attr]
    assert names == ["nats-a", "nats-b", "nats-c"]
    for name, text in blocks:  # each routes to the two others
        others = {f"nats-route://{n}:6222" for n in names if n != name[:-5]}
        assert set(re.findall(r"nats-route://\S+", text)) == others, name


async def store(js: Any, subject: str, ts: int, eid: str) -> None:
    """A producer that must not lose events: publish with a PubAck, again until
    the cluster stores it (the stream's leader may be the node just killed).
    A retry of one stored after all is dropped by the stream (``Nats-Msg-Id``)."""
    for _ in range(600):
        try:
            await js.publish(subject, b"e", headers=encode_headers(ts, "text/plain", event_id=eid), timeout=1)
            return
        except Exception:  # no responders, timeout, reconnecting: a new leader is being elected
            await asyncio.sleep(0.05)
    raise AssertionError(f"could not store {eid}")


async def test_a_nats_node_killed_mid_stream_loses_nothing_and_splits_no_window(
    cluster: Cluster, prefix: str
) -> None:
    """Two workers on the cluster, 60 sources; the node leading the input
    stream is SIGKILLed mid-stream and comes back: every event is in exactly
    one stored result, no result twice, no window split, and neither worker
    fails or stays degraded."""
    cfg = make_config(
        prefix,
        nats={"subject_prefix": prefix, "durable": True, "partitions": 4, "lease_s": 1.0, "ack_wait_s": 5},
        # While the input stream elects a new leader the producers cannot
        # store: a quiet source must not be taken for idle meanwhile (its
        # next events would be refused as too late). The last windows close
        # on the closing round's watermark, not on this.
        aligner={"window_ms": 100, "allowed_lateness_ms": 0, "idle_timeout_ms": 30_000},
    )
    workers = [Engine(cfg), Engine(cfg)]
    nc = await nats.connect(cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    js = nc.jetstream()
    arrived: list[float] = []

    async def on_result(msg: Any) -> None:
        arrived.append(time.monotonic())

    await nc.subscribe(f"{prefix}.out.>", cb=on_result)
    in_stream = stream_names(cfg.nats)[0]
    sent: set[str] = set()
    killed_at, blocked = 0.0, 0.0
    try:
        for w in workers:
            await w.start(cluster.url)
        await until(lambda: settled(cfg, workers), "two workers holding what is rightfully theirs")
        victim = cluster.node(await stream_leader(nc, in_stream))
        base = time.time_ns()
        for i in range(50):
            if i == 20:  # mid-stream, windows open on both workers
                cluster.kill(victim)
                killed_at = time.monotonic()
            if i == 35:
                await cluster.restart(victim)
            began = time.monotonic()
            await publish_round(js, prefix, i, base, sent)
            blocked = max(blocked, time.monotonic() - began)
            await asyncio.sleep(0.02)
        await publish_round(js, prefix, 100, base, set())  # a watermark past every window sent
        results = [
            (h, r)
            for h, r in await all_stored(nc, prefix, sent)
            if r["window"]["start_ns"] < base + 75 * 20 * MS  # not the closing round's
        ]
        failures = [w.supervisor.failure for w in workers]
        rejected = [(r.get("event_id"), r.get("reason")) for _, r in await stored(nc, f"{prefix}.dlq.>")]
        states = [
            (w.supervisor.report(), w.stats.received, w.stats.processed, w.transport and w.transport.state())
            for w in workers
        ]
        check_exactly_once(
            results, sent, [*(f for f in failures if f), f"rejected: {rejected[:20]}", f"workers: {states}"]
        )
        assert failures == [None, None], "a NATS node's death is no worker's failure"
        await until(lambda: all(w.supervisor.status == "ok" for w in workers), "both workers healthy again")
        gaps = [b - a for a, b in zip([killed_at, *arrived], arrived, strict=False) if b > killed_at]
        print(
            f"\nkilled {victim.name} (leader of {in_stream}): producers blocked up to {blocked:.2f} s; "
            f"longest pause in results {max(gaps):.2f} s"
        )
    finally:
        for w in workers:
            await w.stop()
        await nc.close()


def settled(cfg: Any, workers: list[Engine]) -> bool:
    """Each worker holds what the assignment gives it: the join's handover is over."""
    states = [w.transport.state() for w in workers if w.transport is not None]
    owners = assignment([slot.name for slot in slots(cfg.nats)], sorted(s.worker for s in states))
    return len(states) == len(workers) and all(
        set(s.partitions) == {name for name, owner in owners.items() if owner == s.worker} for s in states
    )


async def publish_round(js: Any, prefix: str, i: int, base: int, sent: set[str]) -> None:
    """One event of every source at ``base + i * 20 ms``, each stored (PubAck) before the next round."""
    ids = [f"{source}-{i}" for source in SOURCES]
    sent.update(ids)
    ts = base + i * 20 * MS
    await asyncio.gather(*(store(js, f"{prefix}.in.{e.split('-')[0]}.text", ts, e) for e in ids))
