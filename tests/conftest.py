"""Shared fixtures: a real nats-server per test session, clients, helpers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from engine.config.models import EngineConfig, parse_config
from engine.contracts.subjects import Subjects
from engine.contracts.types import Modality
from engine.runtime.server import EmbeddedServer
from engine.tools.publish import sync_with_server
from engine.wire.codec import encode_headers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_prefixes = itertools.count()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A real nats-server with JetStream on a free loopback port.

    Every durable test engine reserves its streams' ``stream_max_bytes``
    (1 GiB each by default) against the server's file store, which defaults
    to 75 % of the free disk: a session of tests would run out of room to
    reserve on a small disk, so the test server may reserve more than it has."""
    root = tmp_path_factory.mktemp("nats")
    conf = root / "test-server.conf"
    conf.write_text("jetstream {\n  max_file_store: 10TB\n}\n")
    server = EmbeddedServer(root, extra_args=["-c", str(conf)])
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedServer) -> str:
    return nats_server.url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Any]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
def prefix() -> str:
    """A subject prefix of its own per test, so tests sharing a server never cross."""
    return f"t{next(_prefixes)}"


def make_config(prefix: str, **overrides: Any) -> EngineConfig:
    """An engine config with passthrough processors (no model) unless overridden."""
    data: dict[str, Any] = {
        "nats": {"subject_prefix": prefix},
        "routes": [
            {"modality": m, "processor": "passthrough", "batch": {"max_batch_size": 8, "max_wait_ms": 2}}
            for m in ("image", "audio", "text")
        ],
        "aligner": {"window_ms": 100, "allowed_lateness_ms": 0, "idle_timeout_ms": 300},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data, env={})


ROOT = Path(__file__).resolve().parent.parent


_spawned: list[asyncio.subprocess.Process] = []


@pytest.fixture(autouse=True)
def _no_engine_outlives_its_test() -> Iterator[None]:
    """A test that fails half way must not leave an ``autoglm run`` behind."""
    yield
    while _spawned:
        proc = _spawned.pop()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


async def spawn_engine(*args: str, options: tuple[str, ...] = ()) -> asyncio.subprocess.Process:
    """``autoglm [options] run ARGS`` as its own process, returned once it says it is running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.tools.cli", *options, "run", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _spawned.append(proc)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert b"engine running" in line, line
    return proc


class Collector:
    """Subscribes to a subject and keeps every message (subject, headers, JSON body)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, str], Any]] = []
        self._event = asyncio.Event()

    async def cb(self, msg: Any) -> None:
        self.items.append((msg.subject, dict(msg.headers or {}), orjson.loads(msg.data)))
        self._event.set()

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.items) < n:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"expected {n} messages, got {len(self.items)}: {self.items}")
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), left)
        return [body for _, _, body in self.items]

    async def wait_until(self, done: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        """Wait for a condition over what was collected so far."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not done():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {len(self.items)} messages")
            self._event.clear()
            with contextlib.suppress(TimeoutError):  # re-checked often: it may read other collectors
                await asyncio.wait_for(self._event.wait(), min(left, 0.1))

    def event_ids(self) -> list[str]:
        """Every event id the collected results account for (fused and skipped)."""
        out = []
        for _, _, body in self.items:
            for group in (*(body.get("events") or {}).values(), *(body.get("skipped") or {}).values()):
                out.extend(group)
        return out

    async def wait_events(self, ids: set[str], timeout: float = 15.0) -> None:
        await self.wait_until(
            lambda: ids <= set(self.event_ids()), f"results holding {len(ids)} events", timeout
        )


async def stored(nc: Any, subject: str) -> list[tuple[dict[str, str], Any]]:
    """What the results stream kept on ``subject`` (headers, JSON body): what a
    durable consumer reads, each stored message once."""
    sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
    out = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except Exception:  # nats TimeoutError: nothing (more) stored
                break
            out.append((dict(msg.headers or {}), orjson.loads(msg.data)))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 20.0) -> Any:
    """Await ``check()`` until it returns something true, and return that.

    For state that no event announces — a server's view of acks or of a
    stream, an engine in another process — the condition is polled; a
    test never waits for time to pass."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await check()
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # the poll interval


async def engine_health(
    nc: Any, prefix: str, done: Callable[[dict[str, Any]], bool], timeout: float = 20.0
) -> None:
    """Ask ``<prefix>.svc.health`` until its answer satisfies ``done`` (an engine in
    another process: the condition is all a test can see of it)."""

    async def answer() -> bool:
        with contextlib.suppress(Exception):  # not registered yet
            reply = await nc.request(Subjects(prefix).service("health"), b"", timeout=1.0)
            return done(orjson.loads(reply.data))
        return False

    await eventually(answer, "the engine's health to satisfy the condition", timeout)


async def collect(nc: Any, subject: str) -> Collector:
    c = Collector()
    await nc.subscribe(subject, cb=c.cb)
    await sync_with_server(nc)
    return c


async def send(
    nc: Any,
    prefix: str,
    source: str,
    modality: Modality,
    body: bytes,
    ts: int,
    content_type: str | None = None,
    event_id: str | None = None,
    **kw: Any,
) -> None:
    ct = content_type or {"image": "image/jpeg", "audio": "audio/wav", "text": "text/plain"}[modality]
    subject = Subjects(prefix).input(source, modality)
    await nc.publish(subject, body, headers=encode_headers(ts, ct, event_id=event_id, **kw))
