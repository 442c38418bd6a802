"""A 3-node nats-server cluster with JetStream on loopback, for tests.

Each node is the real binary (:class:`~engine.runtime.server.EmbeddedServer`)
started from its own config file: ``server_name``, a ``cluster`` block with
routes to the others, and a ``jetstream`` block with its own store under the
test's directory. Ports are fixed (picked free once), so a node killed and
started again comes back where the others and the clients look for it.

A cluster is ready when JetStream has a meta leader and every node is a
current peer: each node answers ``$JS.API.INFO`` and a probe stream with one
replica per node can be made. Tests wait on that condition, never on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StreamConfig

from engine.runtime.server import EmbeddedServer

#: Seconds a cluster (or a restarted node) may take to elect and catch up.
READY_S = 60.0


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (held together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_config(name: str, client: int, route: int, peers: list[int], store: Path, cluster: str) -> str:
    """One node's nats-server config: what docs/cluster.md shows, on loopback.

    ``max_file_store`` is set high for the reason conftest's session server
    gives: every test engine's streams reserve their ``stream_max_bytes``."""
    routes = ",\n    ".join(f"nats-route://127.0.0.1:{p}" for p in peers)
    return (
        f'server_name: "{name}"\n'
        f"listen: 127.0.0.1:{client}\n"
        f"cluster {{\n  name: {cluster}\n  listen: 127.0.0.1:{route}\n  routes: [\n    {routes}\n  ]\n}}\n"
        f'jetstream {{\n  store_dir: "{store}"\n  max_file_store: 10TB\n}}\n'
    )


@dataclass
class Node:
    name: str
    client_port: int
    server: EmbeddedServer

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"


@dataclass
class Cluster:
    """Three (or ``size``) nodes; :meth:`kill` and :meth:`restart` one of them."""

    root: Path
    size: int = 3
    name: str = "autoglm-test"
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = free_ports(2 * self.size)
        clients, routes = ports[: self.size], ports[self.size :]
        for i in range(self.size):
            name = f"n{i}"
            data = self.root / name
            data.mkdir(parents=True, exist_ok=True)
            conf = data / "server.conf"
            peers = [p for j, p in enumerate(routes) if j != i]
            conf.write_text(node_config(name, clients[i], routes[i], peers, data / "jetstream", self.name))
            # JetStream and the listen address come from the file; -p pins the
            # client port the file names (EmbeddedServer passes it on the command line).
            server = EmbeddedServer(data, jetstream=False, port=clients[i], extra_args=["-c", str(conf)])
            self.nodes.append(Node(name, clients[i], server))

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """Every node, comma-separated: what ``nats.url`` / ``--nats-url`` take."""
        return ",".join(self.urls)

    def node(self, name: str) -> Node:
        """The node whose ``server_name`` is ``name`` (as stream info names a leader)."""
        return next(n for n in self.nodes if n.name == name)

    async def start(self) -> None:
        for n in self.nodes:
            await asyncio.to_thread(n.server.start)
        await self.ready()

    async def ready(self, timeout: float = READY_S) -> None:
        """Wait until JetStream has a meta leader that every node knows, and
        a stream with a replica on every node can be made."""
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            await _answers(n.url, deadline)
        nc = await nats.connect(self.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        try:
            js = nc.jetstream(timeout=2.0)
            probe = StreamConfig(name="CLUSTER_PROBE", subjects=["cluster.probe"], num_replicas=self.size)
            while True:
                try:  # fails ("insufficient resources") while a peer is not current yet
                    await js.add_stream(probe)
                    await js.delete_stream(probe.name)
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    def kill(self, node: Node) -> None:
        """SIGKILL: no clean shutdown, no JetStream flush, routes cut."""
        proc = node.server.process
        assert proc is not None, f"{node.name} is not running"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        node.server.process = None

    async def restart(self, node: Node, timeout: float = READY_S) -> None:
        """Start ``node`` again on its ports and store, and wait until it is a
        current JetStream peer again."""
        await asyncio.to_thread(node.server.start)
        await self.ready(timeout)

    def stop(self) -> None:
        for n in self.nodes:
            n.server.stop()


async def _answers(url: str, deadline: float) -> None:
    """Until the node at ``url`` answers ``$JS.API.INFO`` (it knows a meta leader)."""
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        while True:
            try:
                await nc.jetstream().account_info()
                return
            except Exception:  # "JetStream system temporarily unavailable", no responders
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def stream_leader(nc: Any, stream: str) -> str:
    """The ``server_name`` of the node leading ``stream``'s replicas."""
    info = await nc.jetstream().stream_info(stream)
    assert info.cluster is not None and info.cluster.leader, f"{stream} has no leader"
    leader: str = info.cluster.leader
    return leader


@contextlib.asynccontextmanager
async def nats_cluster(root: Path, size: int = 3) -> AsyncIterator[Cluster]:
    """A running cluster under ``root``, stopped (every node) on the way out."""
    cluster = Cluster(root, size)
    try:
        await cluster.start()
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)
