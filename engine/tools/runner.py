"""The commands that run something until stopped: ``run``, ``demo``, ``monitor``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from engine.config.models import (
    NATS_URL_ENV,
    with_overrides,
)
from engine.contracts.errors import ConfigError
from engine.contracts.subjects import Subjects
from engine.tools.options import DEFAULT_CONFIG, open_nats, read_config
from engine.tools.queries import reload_line
from engine.tools.traffic import overrides_of

if TYPE_CHECKING:
    from engine.runtime.engine import Engine
    from engine.transport.security import LockedDown


async def cmd_run(args: argparse.Namespace) -> int:
    from engine.runtime.engine import Engine
    from engine.transport.security import redact_url

    overrides: dict[str, dict[str, Any]] = overrides_of(args)
    cfg = with_overrides(read_config(args.config), overrides)
    locked = None
    if args.secure:
        if args.nats_url or cfg.nats.url:
            raise ConfigError(["--secure locks down the embedded server: drop --nats-url / nats.url"])
        from engine.config.models import AuthConfig
        from engine.transport.security import inbox_prefix, lock_down

        locked = lock_down(Path(cfg.nats.data_dir) / "secure", cfg.nats)
        auth = AuthConfig(user="engine", password=SecretStr(locked.passwords["engine"]))
        overrides["nats"] = {
            "server_config": str(locked.server_config),
            "auth": auth,
            "inbox_prefix": inbox_prefix("engine"),  # the only inbox it may read
        }
        cfg = with_overrides(cfg, overrides)
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)  # noqa: ASYNC240
    if args.workers > 1:
        from engine.tools.workers import run_workers
        from engine.transport.security import read_env_file

        return await run_workers(
            args.workers,
            cfg,
            url=args.nats_url or cfg.nats.url,
            child_args=[*(["--config", path] if path else []), *trace_args(args)],
            options=["--log-level", str(args.log_level), "--log-format", args.log_format],
            env=read_env_file(locked.env_files["engine"]) if locked is not None else None,
            note=(lambda url: secure_note(locked, url)) if locked is not None else None,
        )
    engine = Engine(cfg, config_path=path, overrides=overrides)
    url = redact_url(await engine.start(args.nats_url))  # what is shown: never a password
    # The handlers go in before the lines that say we run: a supervisor (or a
    # test) that signals as soon as it reads them must not meet SIGHUP's default, exit.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def reload() -> None:
        report = await engine.reload()
        print(f"autoglm: reload {reload_line(report)}", flush=True)

    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    inputs = Subjects(cfg.nats.subject_prefix).input_pattern("<source>", "<modality>")
    print(f"autoglm: engine running on {url}; inputs on {inputs}")
    if locked is not None:
        print(secure_note(locked, url), flush=True)
    print("autoglm: Ctrl-C (SIGINT) or SIGTERM drains and exits; SIGHUP reloads the routing file", flush=True)
    return await serve(engine, stop)


def secure_note(locked: LockedDown, url: str) -> str:
    env = locked.env_files
    return (
        "autoglm: --secure: anonymous clients are refused. Credentials (0600): "
        f"producer {env['producer']}, results reader {env['reader']}, tools {env['engine']}. "
        "Publish with:\n"
        f"  autoglm publish --nats-url {url} --auth-file {env['producer']} --source cam1 --text hello"
    )


def trace_args(args: argparse.Namespace) -> list[str]:
    return ["--trace-file", args.trace_file] if args.trace_file else []


async def serve(engine: Engine, stop: asyncio.Event) -> int:
    """Run until ``stop`` (drain, exit 0) or until a supervised task dies: then
    stop without acking what is held and exit non-zero, so that whatever runs
    the engine (a container, systemd) starts a fresh one."""
    from engine.runtime.supervisor import EXIT_FAILED

    loop = asyncio.get_running_loop()
    failed = loop.create_task(engine.supervisor.failed.wait())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
    if failed.done():
        stopped.cancel()
        print(f"autoglm: engine failed ({engine.supervisor.failure}); stopping", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(engine.stop(), 30)
        return EXIT_FAILED
    failed.cancel()
    print("autoglm: draining...", flush=True)
    await engine.stop()
    print(f"autoglm: stopped; {engine.stats.results} results, {engine.stats.dlq_published} rejected")
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from engine.tools.demo import run_demo

    overrides = overrides_of(args)
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)  # noqa: ASYNC240
    return await run_demo(
        with_overrides(read_config(args.config), overrides),
        config_path=path,
        overrides=overrides,
        seconds=args.seconds,
        sources=args.sources,
        nats_url=args.nats_url,
        width=args.width,
        height=args.height,
        monitor_port=args.monitor,
    )


async def cmd_monitor(args: argparse.Namespace) -> int:
    """The live page (engine/monitor): reads NATS only, serves GET routes only."""
    from engine.monitor.server import Monitor

    cfg = read_config(args.config)
    if args.secure and not args.auth_file:  # the reader's credentials, as `run --secure` wrote them
        reader = Path(cfg.nats.data_dir) / "secure" / "reader.env"
        if not reader.exists():
            raise ConfigError([f"--secure: no {reader} (start the engine with `autoglm run --secure`)"])
        args.auth_file = str(reader)
    if not (args.nats_url or os.environ.get(NATS_URL_ENV) or cfg.nats.url):
        url_file = Path(cfg.nats.data_dir) / "run" / "engine.url"  # an engine on its embedded server
        args.nats_url = url_file.read_text().strip() if url_file.exists() else None
    nc, _ = await open_nats(args)
    prefix = args.prefix or cfg.nats.subject_prefix
    monitor = Monitor(nc, prefix, host=args.host, port=args.port, frames=not args.secure)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, monitor.stop)
    try:
        await monitor.serve(lambda url: print(f"autoglm monitor: {url} (prefix {prefix})", flush=True))
    finally:
        await nc.close()
    return 0
