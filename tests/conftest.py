"""Shared fixtures: a real nats-server per test session, clients, helpers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import orjson
import pytest

from engine.config.models import EngineConfig, parse_config
from engine.contracts.subjects import Subjects
from engine.contracts.types import Modality
from engine.runtime.server import EmbeddedServer
from engine.wire.codec import encode_headers

if TYPE_CHECKING:
    from processors.registry import ProcessorSpec

# Nothing here imports the producer tools (engine/tools/publish.py, soundfile,
# OpenTelemetry): a test that needs them imports them itself, so a unit test
# neither pays for them nor breaks with them.

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


@dataclass(frozen=True)
class Transport:
    """How an engine under test takes its inputs: ``core`` (a plain
    subscription, at most once) or ``jetstream`` (durable intake, at least
    once). The session's server has JetStream, so a config that leaves
    ``nats.durable`` unset would always run durable."""

    name: str

    @property
    def durable(self) -> bool:
        return self.name == "jetstream"

    def config(self, prefix: str, **overrides: Any) -> EngineConfig:
        """:func:`make_config` in this transport (``nats=`` overrides merge in)."""
        nats_section = {"subject_prefix": prefix, **overrides.pop("nats", {}), "durable": self.durable}
        return make_config(prefix, nats=nats_section, **overrides)


@pytest.fixture(params=["core", "jetstream"])
def transport(request: pytest.FixtureRequest) -> Transport:
    """Runs a test once per transport; a test about one mode sets ``nats.durable`` itself."""
    return Transport(request.param)


@pytest.fixture
def use_processor(monkeypatch: pytest.MonkeyPatch) -> Callable[[ProcessorSpec], None]:
    """Register a test processor for this test only (before its config is parsed:
    the config checks processor names against the registry). An engine in
    another process registers its own (see tests/crashing_engine.py)."""
    from processors.registry import REGISTRY

    def use(spec: ProcessorSpec) -> None:
        monkeypatch.setitem(REGISTRY, spec.name, spec)

    return use


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
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if b"engine running" not in line:  # it exited (or said something else): say why
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        err = await asyncio.wait_for(proc.stderr.read(), 10)
        code = await proc.wait()
        raise AssertionError(f"autoglm run exited ({code}) before it ran: {line!r}\n{err.decode()}")
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


async def stored(nc: Any, subject: str, timeout: float = 10.0) -> list[tuple[dict[str, str], Any]]:
    """What the results stream kept on ``subject`` (headers, JSON body): what a
    durable consumer reads, each stored message once.

    The stream says first how many it holds, and all of those are read: a
    pause in delivery (a server descheduled for a second on a loaded machine)
    used to end the read early and silently, and the events in the unread
    tail looked lost."""
    js = nc.jetstream()
    stream = await js.find_stream_name_by_subject(subject)
    held = sum(((await js.stream_info(stream, subjects_filter=subject)).state.subjects or {}).values())
    if not held:
        return []
    sub = await js.subscribe(subject, ordered_consumer=True)
    out = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=timeout)
            except Exception as exc:  # nats TimeoutError: a stall, not the end
                raise AssertionError(f"read {len(out)} of the {held} messages stored on {subject}") from exc
            out.append((dict(msg.headers or {}), orjson.loads(msg.data)))
            if len(out) >= held and msg.metadata.num_pending == 0:
                return out
    finally:
        await sub.unsubscribe()


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


async def until(done: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """:func:`eventually` for a plain condition over this process's own state."""

    async def check() -> bool:
        return done()

    await eventually(check, what, timeout)


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


async def srv_stats(nc: Any, prefix: str, timeout: float = 5.0) -> dict[str, Any]:
    """The counters the engine serving ``prefix`` reports on ``$SRV.STATS``
    (what ``autoglm status`` shows): observable from outside, wherever the
    engine keeps them inside."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish("$SRV.STATS.autoglm", b"", reply=inbox)
        async with asyncio.timeout(timeout):
            while True:  # every engine on the server answers: find ours
                stats = orjson.loads((await sub.next_msg(timeout=timeout)).data)
                if stats["metadata"].get("subject_prefix") == prefix:
                    data: dict[str, Any] = stats["endpoints"][0]["data"]
                    return data
    finally:
        await sub.unsubscribe()


async def stats_when(
    nc: Any, prefix: str, done: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20.0
) -> dict[str, Any]:
    """Ask ``$SRV.STATS`` until the engine's counters satisfy ``done``; return them."""

    async def answer() -> dict[str, Any] | None:
        with contextlib.suppress(Exception):  # not registered yet, or a slow answer
            stats = await srv_stats(nc, prefix, timeout=1.0)
            return stats if done(stats) else None
        return None

    found: dict[str, Any] = await eventually(answer, what, timeout)
    return found


async def round_trip(nc: Any) -> None:
    """Return once the server has processed everything ``nc`` sent, a new
    subscription included: two flushes, for the nats-py reason that
    ``engine.tools.publish.sync_with_server`` gives (kept here so that the
    fixtures do not import the producer tools)."""
    await nc.flush()
    await nc.flush()


async def collect(nc: Any, subject: str) -> Collector:
    c = Collector()
    await nc.subscribe(subject, cb=c.cb)
    await round_trip(nc)
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
