"""``autoglm run --workers K``: K engine processes on one machine, kept up by one parent.

Each worker is a plain ``autoglm run`` of the same configuration, so the
partitions (engine/transport/partitions.py) spread over them and the
CPU-bound processors use K cores instead of one. The parent does no engine
work. It starts the embedded nats-server once (when no NATS url is given)
and points every worker at it; forwards each worker's output, one line at a
time, under its number; restarts a worker that dies, after a delay that
doubles while it keeps dying young (0.5 s up to 10 s); and on SIGINT or
SIGTERM asks every worker to drain, waits for them, then stops the server.
It gives up (stops the others, exits 1) when a worker is refused at start
(exit 2: its configuration, a port, a path) or dies young five times in a row.

The workers and the server run in their own process groups: a Ctrl-C at the
terminal reaches the parent alone, which stops them in order. Were the server
to get it too, it would leave while the workers drain into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.models import EngineConfig
from engine.contracts.errors import ConfigError, TransportError
from engine.runtime.server import EmbeddedServer
from engine.transport.security import connect_kwargs, redact_url

#: The first restart delay, doubled at each young death in a row, up to MAX_DELAY_S.
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0
#: A worker that ran this long was healthy: its next death starts the count over.
STEADY_S = 30.0
#: Young deaths in a row after which the worker is not kept up (the parent gives up).
GIVE_UP_AFTER = 5
#: How long the workers may drain after SIGTERM before they are killed.
DRAIN_S = 120.0
#: ``autoglm``'s exit code for what the user must fix (cli.py): restarting cannot help.
EXIT_REFUSED = 2

Say = Callable[[str], None]


class GaveUp(Exception):
    """A worker cannot be kept up; the message says which and why."""


@dataclass
class Worker:
    number: int
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    #: It said "engine running" (a death before that with exit 2 is a refusal).
    running: bool = False
    #: Deaths in a row, each within STEADY_S of its start.
    young_deaths: int = 0
    restarts: int = 0
    #: Its exit status once the parent stopped it.
    last: int | None = None


def _exit(rc: int) -> str:
    return f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"


class Workers:
    """The K worker processes and what keeps them up."""

    def __init__(self, argvs: list[list[str]], env: dict[str, str], say: Say, banner: str = "") -> None:
        self.workers = [Worker(i + 1, argv) for i, argv in enumerate(argvs)]
        self.env = env
        self.say = say
        self.stopping = asyncio.Event()
        #: Said once, when every worker has said it runs.
        self.banner = banner

    def signal_all(self, sig: signal.Signals) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def _forward(self, w: Worker, stdout: asyncio.StreamReader) -> None:
        async for raw in stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.say(f"[worker {w.number}] {line}")
            if "engine running" in line:
                w.running = True
                if self.banner and all(x.running for x in self.workers):
                    self.say(self.banner)
                    self.banner = ""

    async def _once(self, w: Worker) -> int:
        """Start ``w``, forward its output, return its exit status."""
        proc = await asyncio.create_subprocess_exec(
            *w.argv, stdout=asyncio.subprocess.PIPE, env=self.env, start_new_session=True
        )
        w.proc, w.started, w.running = proc, time.monotonic(), False
        if self.stopping.is_set():  # started while the others were being stopped
            proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        pump = asyncio.get_running_loop().create_task(self._forward(w, proc.stdout))
        rc = await proc.wait()
        with contextlib.suppress(TimeoutError):  # its last lines often say why it died
            await asyncio.wait_for(pump, 5)
        return rc

    async def keep(self, w: Worker) -> None:
        """Run ``w`` until the parent stops; raise :class:`GaveUp` when it cannot be kept up."""
        while True:
            rc = await self._once(w)
            if self.stopping.is_set():
                w.last = rc
                return
            lived = time.monotonic() - w.started
            pid = w.proc.pid if w.proc is not None else "?"
            if rc == EXIT_REFUSED and not w.running:
                raise GaveUp(f"worker {w.number} (pid {pid}) was refused at start ({_exit(rc)}, see above)")
            w.young_deaths = 1 if lived >= STEADY_S else w.young_deaths + 1
            if w.young_deaths >= GIVE_UP_AFTER:
                raise GaveUp(
                    f"worker {w.number} died {w.young_deaths} times in a row, each within {STEADY_S:.0f} s "
                    f"of its start (last: {_exit(rc)})"
                )
            delay = min(FIRST_DELAY_S * 2 ** (w.young_deaths - 1), MAX_DELAY_S)
            self.say(
                f"autoglm: worker {w.number} (pid {pid}) ended with {_exit(rc)} after {lived:.1f} s; "
                f"restarting it in {delay:.1f} s"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                w.last = 0
                return
            w.restarts += 1

    async def run(self, stop: asyncio.Event, server: EmbeddedServer | None) -> int:
        """Keep every worker up until ``stop``; then drain them. 0 when stopped
        as asked and every worker exited 0, 1 otherwise."""
        loop = asyncio.get_running_loop()
        keepers = [loop.create_task(self.keep(w)) for w in self.workers]
        watch: list[asyncio.Future[Any]] = [loop.create_task(stop.wait())]
        if server is not None and server.process is not None:
            watch.append(loop.create_task(asyncio.to_thread(server.process.wait)))
        await asyncio.wait([*keepers, *watch], return_when=asyncio.FIRST_COMPLETED)
        failure = None
        if not stop.is_set():
            failure = _failure(keepers) or "the embedded nats-server exited"
            self.say(f"autoglm: {failure}; stopping every worker")
        else:
            self.say(f"autoglm: stopping {len(self.workers)} workers (each drains)...")
        self.stopping.set()
        self.signal_all(signal.SIGTERM)
        _, late = await asyncio.wait(keepers, timeout=DRAIN_S)
        if late:
            self.say(f"autoglm: {len(late)} workers still draining after {DRAIN_S:.0f} s; killing them")
            self.signal_all(signal.SIGKILL)
            await asyncio.wait(late)
        for task in watch:
            task.cancel()
        failure = failure or _failure(keepers)
        bad = [w for w in self.workers if w.last not in (0, None)]
        for w in bad:
            self.say(f"autoglm: worker {w.number} ended with {_exit(w.last or 0)} while stopping")
        return 1 if failure or bad else 0


def _failure(keepers: list[asyncio.Task[None]]) -> str | None:
    """Why the first keeper that gave up did (every one's exception is read)."""
    found = [str(t.exception()) for t in keepers if t.done() and t.exception() is not None]
    return found[0] if found else None


async def check_jetstream(count: int, cfg: EngineConfig, url: str | None) -> None:
    """Workers share the partitions through JetStream leases: refuse K > 1
    without it, before any worker starts."""
    if cfg.nats.durable is False:
        raise ConfigError(
            [
                f"--workers {count}: workers share the partitions through JetStream, but nats.durable "
                "= false; set it true (or leave it out) or run one worker"
            ]
        )
    if not url:  # the embedded server always has JetStream
        return
    from engine.tools.publish import connect

    nc = await connect(url, **connect_kwargs(cfg.nats))
    try:
        await nc.jetstream().account_info()
    except Exception as exc:  # nats-py raises several types: no JetStream here, for this account
        raise ConfigError(
            [
                f"--workers {count}: the server at {redact_url(url)} offers no JetStream ({exc}); "
                "workers share the partitions through JetStream: enable it (nats-server -js) or run "
                "one worker"
            ]
        ) from exc
    finally:
        await nc.close()


async def run_workers(
    count: int,
    cfg: EngineConfig,
    *,
    url: str | None,
    child_args: list[str],
    options: list[str],
    env: dict[str, str] | None = None,
    note: Callable[[str], str] | None = None,
    say: Say = lambda line: print(line, flush=True),
) -> int:
    """Start ``count`` workers (``autoglm <options> run <child_args> --nats-url
    URL``, worker i with ``--metrics-port PORT+i-1`` when a fixed metrics port
    is set) and keep them up until SIGINT/SIGTERM; SIGHUP reaches each of them
    (a reload). The embedded server is started here when ``url`` is None.
    ``env`` is added to the workers' environment; ``note(url)`` to what is said
    once they all run."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before anything starts: nothing is left behind
        loop.add_signal_handler(sig, stop.set)
    await check_jetstream(count, cfg, url)
    if cfg.nats.partitions == 1:
        print(
            f"autoglm: nats.partitions = 1: one worker works and the other {count - 1} stand by to take "
            f"over; set nats.partitions >= {count} to spread the sources over them",
            file=sys.stderr,
            flush=True,
        )
    server = None
    if not url:
        conf = cfg.nats.server_config
        server = EmbeddedServer(cfg.nats.data_dir, extra_args=["-c", conf] if conf else None, own_group=True)
        url = await asyncio.to_thread(server.start)
        # `autoglm health` (the container HEALTHCHECK) finds the server here.
        (Path(cfg.nats.data_dir) / "run" / "engine.url").write_text(url)
    try:
        port = cfg.metrics.port
        cli = [sys.executable, "-m", "engine.tools.cli", *options, "run", *child_args, "--nats-url", url]
        argvs = [[*cli, *(["--metrics-port", str(port + i)] if port else [])] for i in range(count)]
        shown = redact_url(url)
        banner = (
            f"autoglm: {count} workers running on {shown}"
            + (f" (embedded nats-server, pid {server.process.pid})" if server and server.process else "")
            + f"; `autoglm status --nats-url {shown}` shows them; Ctrl-C or SIGTERM drains and stops "
            "them all, SIGHUP reloads each"
        )
        if note is not None:
            banner += "\n" + note(shown)
        workers = Workers(argvs, {**os.environ, **(env or {})}, say, banner)
        loop.add_signal_handler(signal.SIGHUP, workers.signal_all, signal.SIGHUP)
        return await workers.run(stop, server)
    except OSError as exc:
        raise TransportError(f"cannot start a worker: {exc}") from exc
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
