"""``autoglm run --workers K``: one parent keeps K engine processes up on one machine."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import nats

from engine.observe.service import find_engines
from tests.conftest import ROOT, eventually, spawn_engine

PARTITIONS = 16  # 17 slots: two workers both get some, but for a 2**-16 chance


def config(tmp_path: Path, prefix: str, extra: str = "") -> Path:
    path = tmp_path / "routing.toml"
    path.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\ndata_dir = "{tmp_path / "data"}"\n'
        f"partitions = {PARTITIONS}\nlease_s = 1.0\n{extra}"
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    return path


async def workers_of(nc: Any, prefix: str) -> dict[str, list[str]]:
    """Worker name -> the partitions it owns, for every engine of ``prefix`` answering $SRV.STATS."""
    out = {}
    for reply in await find_engines(nc):
        if (reply.get("metadata") or {}).get("subject_prefix") == prefix:
            data = reply["endpoints"][0]["data"]
            out[data["worker"]] = data["partitions"]
    return out


def pid_of(worker: str) -> int:
    return int(worker.rsplit("-", 2)[1])  # <host>-<pid>-<hex>


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_two_workers_share_the_partitions_a_killed_one_comes_back_and_sigterm_stops_all(
    tmp_path: Path, prefix: str
) -> None:
    cfg = config(tmp_path, prefix)  # no nats.url: the parent starts the embedded server once
    parent = await spawn_engine("--workers", "2", "--config", str(cfg))
    url = (tmp_path / "data" / "run" / "engine.url").read_text().strip()
    nc = await nats.connect(url)
    try:

        async def sharing() -> dict[str, list[str]] | None:
            found = await workers_of(nc, prefix)
            owned = [p for parts in found.values() for p in parts]
            spread = len(found) == 2 and all(found.values())
            return found if spread and len(owned) == len(set(owned)) == PARTITIONS + 1 else None

        before = await eventually(sharing, "two workers sharing every partition", 60)
        victim = pid_of(sorted(before)[0])
        os.kill(victim, signal.SIGKILL)

        async def back() -> dict[str, list[str]] | None:
            found = await sharing()
            return found if found is not None and not set(found) & {sorted(before)[0]} else None

        after = await eventually(back, "a new worker in the killed one's place", 60)
        assert gone(victim) and len(set(after) - set(before)) == 1
    finally:
        await nc.close()
    parent.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(parent.communicate(), 120)
    text = out.decode()
    assert parent.returncode == 0, text + err.decode()
    assert re.search(rf"worker \d \(pid {victim}\) ended with signal SIGKILL .*; restarting it", text)
    assert text.count("autoglm: stopped;") == 2  # each worker drained
    server = re.search(r"embedded nats-server, pid (\d+)", text)
    assert server is not None
    assert all(gone(pid_of(w)) for w in after) and gone(int(server.group(1)))


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.tools.cli", "run", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_more_than_one_worker_needs_jetstream(tmp_path: Path, prefix: str) -> None:
    cfg = config(tmp_path, prefix, "durable = false\n")
    code, out, err = await run_cli("--workers", "2", "--config", str(cfg))
    assert code == 2, out + err
    assert "--workers 2: workers share the partitions through JetStream, but nats.durable = false" in err
    assert not (tmp_path / "data").exists()  # refused before any server or worker started


async def test_the_parent_gives_up_on_a_worker_refused_at_start(
    tmp_path: Path, prefix: str, nats_url: str
) -> None:
    """Worker 1's metrics port is taken: it exits 2 before it runs, and
    restarting cannot help, so the parent stops the other and exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config(tmp_path, prefix, f"[metrics]\nport = {port}\n")
        code, out, err = await run_cli("--workers", "2", "--config", str(cfg), "--nats-url", nats_url)
    assert code == 1, out + err
    assert "worker 1 (pid " in out and "was refused at start (exit code 2, see above)" in out
    assert "stopping every worker" in out
    assert not (tmp_path / "data").exists()  # a url was given: no embedded server
