"""``autoglm``: run, publish, tail, status, reload, replay, health, validate, plugins, models, ab, demo.

A mistake on the command line or in a file it names (a flag out of range, a
missing file, an invalid routing file) ends with one line on stderr,
``autoglm <command>: <what is wrong>``, and exit code 2; a failure while
working (NATS unreachable, a file that is not an image) with exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import SecretStr

from engine.config.models import (
    NATS_URL_ENV,
    EngineConfig,
    NatsConfig,
    load_config,
    nats_from_env,
    nats_problems,
    updated,
    with_overrides,
)
from engine.contracts.errors import AutoGLMError, ConfigError
from engine.contracts.plugins import REFUSED
from engine.contracts.subjects import Subjects, valid_source
from engine.observe.logs import setup_logging

if TYPE_CHECKING:
    from engine.runtime.engine import Engine
    from engine.transport.security import LockedDown

DEFAULT_CONFIG = "routing.toml"


def _config(path: str | None) -> EngineConfig:
    """``--config`` if given, else ./routing.toml, else the built-in defaults."""
    if path is None and not Path(DEFAULT_CONFIG).exists():
        from engine.tools.demo import default_config

        return default_config()
    return load_config(path or DEFAULT_CONFIG)


def _client_nats(args: argparse.Namespace) -> NatsConfig:
    """A tool's connection: ``--config``'s ``[nats]`` if given, then the
    environment, then ``--auth-file`` (an env file such as ``--secure`` writes),
    then ``--nats-url``."""
    from engine.transport.security import read_env_file

    env = dict(os.environ)
    if getattr(args, "auth_file", None):
        env.update(read_env_file(args.auth_file))
    base = load_config(args.config).nats if getattr(args, "config", None) else NatsConfig()
    nats = nats_from_env(base, env)
    if getattr(args, "nats_url", None):
        nats = updated(nats, {"url": args.nats_url}, ("nats",))
    problems = nats_problems(nats)
    if problems:
        raise ConfigError(problems)
    return nats


async def _open(args: argparse.Namespace, timeout: float = 5.0) -> tuple[Any, NatsConfig]:
    from engine.tools.publish import connect
    from engine.transport.security import connect_kwargs

    nats = _client_nats(args)
    if not nats.url:
        raise ConfigError([f"no NATS url: pass --nats-url or set {NATS_URL_ENV}"])
    return await connect(nats.url, timeout=timeout, **connect_kwargs(nats)), nats


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    """uvloop where it is installed: its event loop costs far less per
    message than asyncio's (benchmarks/RESULTS.md, bus)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass


async def _run(args: argparse.Namespace) -> int:
    from engine.runtime.engine import Engine
    from engine.transport.security import redact_url

    overrides: dict[str, dict[str, Any]] = _overrides(args)
    cfg = with_overrides(_config(args.config), overrides)
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
            child_args=[*(["--config", path] if path else []), *_trace_args(args)],
            options=["--log-level", str(args.log_level), "--log-format", args.log_format],
            env=read_env_file(locked.env_files["engine"]) if locked is not None else None,
            note=(lambda url: _secure_note(locked, url)) if locked is not None else None,
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
        print(f"autoglm: reload {_reload_line(report)}", flush=True)

    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    inputs = Subjects(cfg.nats.subject_prefix).input_pattern("<source>", "<modality>")
    print(f"autoglm: engine running on {url}; inputs on {inputs}")
    if locked is not None:
        print(_secure_note(locked, url), flush=True)
    print("autoglm: Ctrl-C (SIGINT) or SIGTERM drains and exits; SIGHUP reloads the routing file", flush=True)
    return await serve(engine, stop)


def _secure_note(locked: LockedDown, url: str) -> str:
    env = locked.env_files
    return (
        "autoglm: --secure: anonymous clients are refused. Credentials (0600): "
        f"producer {env['producer']}, results reader {env['reader']}, tools {env['engine']}. "
        "Publish with:\n"
        f"  autoglm publish --nats-url {url} --auth-file {env['producer']} --source cam1 --text hello"
    )


def _trace_args(args: argparse.Namespace) -> list[str]:
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


def _reload_line(report: dict[str, Any]) -> str:
    if not report["ok"]:
        return "refused, the running config stays:\n  " + "\n  ".join(report["errors"])
    line = f"applied: {', '.join(report['applied']) or 'nothing changed'}"
    if report["restart_required"]:
        line += f"; needs a restart (running values kept): {', '.join(report['restart_required'])}"
    return line


async def _reload(args: argparse.Namespace) -> int:
    from engine.observe.service import reload_all

    nc, _ = await _open(args)
    try:
        reports = await reload_all(nc, args.prefix, timeout=args.timeout)
    finally:
        await nc.close()
    for r in reports:
        print(f"{r['id']} ({r['prefix']}): {_reload_line(r)}")
    if not reports:
        print("no engine answered", file=sys.stderr)
        return 1
    return 0 if all(r["ok"] for r in reports) else 2


async def _replay(args: argparse.Namespace) -> int:
    from engine.tools.replay import replay, stderr, summary

    cfg = _config(args.config)
    # --out is opened before connecting: an unwritable path is refused at once
    out = open(args.out, "wb") if args.out and args.out != "-" else None  # noqa: ASYNC230, SIM115
    try:
        nc, _ = await _open(args)
        started = time.monotonic()
        try:
            stats = await replay(nc, cfg, args.since, args.speed, out or sys.stdout.buffer)
        finally:
            await nc.close()
    finally:
        if out is not None:
            out.close()
    stderr(summary(stats, time.monotonic() - started))
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Command-line values that win over the routing file, now and on every reload."""
    out: dict[str, dict[str, Any]] = {}
    if args.trace_file:
        out["tracing"] = {"file": args.trace_file}
    if getattr(args, "metrics_port", None) is not None:
        out["metrics"] = {"port": args.metrics_port}
    return out


async def _publish(args: argparse.Namespace) -> int:
    from engine.tools.publish import publish_file
    from engine.transport.security import connect_kwargs

    nats = _client_nats(args)
    if not nats.url:
        raise ConfigError([f"no NATS url: pass --nats-url or set {NATS_URL_ENV}"])
    streaming = args.video or args.audio or args.text_file or args.text == "-"
    _check_stream_flags(args, bool(streaming))
    if streaming:
        return await _publish_stream(args, nats)
    sent = await publish_file(
        nats.url,
        args.source,
        connect_opts=connect_kwargs(nats),
        claim_check=args.claim_check,
        bucket=nats.object_bucket,
        image=args.image,
        text=args.text,
        prefix=args.prefix or nats.subject_prefix,
        event_id=args.id,
        wait=args.wait,
        traceparent=args.traceparent,
    )
    return 0 if sent else 1


def _check_stream_flags(args: argparse.Namespace, streaming: bool) -> None:
    """Flags that mean nothing with what was chosen: refused, not ignored."""
    problems = []
    if streaming and args.wait:
        problems.append("--wait is for --image and --text; follow a stream's results with autoglm tail")
    if args.with_audio and not args.video:
        problems.append("--with-audio needs --video (the audio track of the same input)")
    if args.follow and not args.text_file:
        problems.append("--follow needs --text-file")
    if args.loop and not (args.video or args.audio):
        problems.append("--loop needs --video or --audio (a file)")
    if problems:
        raise ConfigError(problems)


async def _publish_stream(args: argparse.Namespace, nats: NatsConfig) -> int:
    from engine.sources.producer import Producer
    from engine.sources.reader import MediaOptions
    from engine.tools.stream import publish_stream
    from engine.transport.security import connect_kwargs

    media = MediaOptions(
        audio=args.with_audio,
        fps=args.fps,
        quality=None if args.raw else args.quality,
        chunk_ms=args.chunk_ms,
        loop=args.loop,
        realtime=not args.as_fast_as_possible,
        timeout=args.timeout,
        input_format=args.input_format,
    )
    async with Producer(
        nats.url or "",
        source=args.source,
        prefix=args.prefix or nats.subject_prefix,
        connect_opts=connect_kwargs(nats),
        id_prefix=args.id,
        traceparent=args.traceparent,
        claim_check=args.claim_check,
        bucket=nats.object_bucket,
    ) as producer:
        await publish_stream(
            producer,
            video=args.video,
            audio=args.audio,
            text_file="-" if args.text == "-" else args.text_file,
            follow=args.follow,
            media=media,
        )
    return 0


async def _tail(args: argparse.Namespace) -> int:
    from engine.sources.results import Results
    from engine.tools.tail import tail
    from engine.transport.security import connect_kwargs
    from engine.transport.streams import stream_names

    nats = _client_nats(args)
    if not nats.url:
        raise ConfigError([f"no NATS url: pass --nats-url or set {NATS_URL_ENV}"])
    results = Results(
        nats.url,
        sources=args.source or None,
        prefix=args.prefix or nats.subject_prefix,
        dlq=args.dlq,
        durable=args.durable,
        from_start=args.from_start,
        since=args.since,
        connect_opts=connect_kwargs(nats),
        stream=stream_names(nats)[1] if nats.stream else None,  # [nats] stream names it: no lookup
    )
    await tail(results, as_json=args.json, count=args.count)
    return 0


async def _status(args: argparse.Namespace) -> int:
    import orjson

    from engine.observe.service import find_engines, status_table
    from engine.transport.security import redact_url

    nc, nats = await _open(args)
    url = redact_url(nats.url or "")
    try:
        if args.info:  # the raw $SRV.INFO replies, as NATS tooling sees them
            for info in await find_engines(nc, verb="INFO"):
                print(orjson.dumps(info).decode())
            return 0
        while True:
            table = status_table(await find_engines(nc))
            if args.once:
                print(table)
                return 0
            print("\x1b[2J\x1b[H" + time.strftime("%H:%M:%S ") + url + "\n" + table, flush=True)
            await asyncio.sleep(args.interval)
    finally:
        await nc.close()


async def _models(args: argparse.Namespace) -> int:
    from engine.observe.service import find_engines
    from engine.tools.experiments import models_table

    nc, _ = await _open(args)
    try:
        print(models_table(await find_engines(nc)))
    finally:
        await nc.close()
    return 0


async def _ab_report(args: argparse.Namespace) -> int:
    from engine.observe.service import find_engines
    from engine.tools.experiments import Report, results_since, shadows_of

    cfg = _config(args.config)
    nc, _ = await _open(args)
    report = Report()
    try:
        async for result in results_since(nc, cfg, args.since):
            report.add(result)
        prefix = cfg.nats.subject_prefix
        replies = [
            r for r in await find_engines(nc) if (r.get("metadata") or {}).get("subject_prefix") == prefix
        ]
    finally:
        await nc.close()
    print(report.text(shadows_of(replies)))
    return 0


async def _monitor(args: argparse.Namespace) -> int:
    """The live page (engine/monitor): reads NATS only, serves GET routes only."""
    from engine.monitor.server import Monitor

    cfg = _config(args.config)
    if args.secure and not args.auth_file:  # the reader's credentials, as `run --secure` wrote them
        reader = Path(cfg.nats.data_dir) / "secure" / "reader.env"
        if not reader.exists():
            raise ConfigError([f"--secure: no {reader} (start the engine with `autoglm run --secure`)"])
        args.auth_file = str(reader)
    if not (args.nats_url or os.environ.get(NATS_URL_ENV) or cfg.nats.url):
        url_file = Path(cfg.nats.data_dir) / "run" / "engine.url"  # an engine on its embedded server
        args.nats_url = url_file.read_text().strip() if url_file.exists() else None
    nc, _ = await _open(args)
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


async def _health(args: argparse.Namespace) -> int:
    """Exit 0 when an engine answers on ``<prefix>.svc.health`` (container HEALTHCHECK)."""
    import orjson

    from engine.transport.security import redact_url

    cfg = _config(args.config)
    url = args.nats_url or os.environ.get(NATS_URL_ENV) or cfg.nats.url
    if not url:  # an engine on its embedded server writes the URL beside its data
        url_file = Path(cfg.nats.data_dir) / "run" / "engine.url"
        url = url_file.read_text().strip() if url_file.exists() else None
        secure_env = Path(cfg.nats.data_dir) / "secure" / "engine.env"
        if url and not args.auth_file and secure_env.exists():  # started with --secure
            args.auth_file = str(secure_env)
    if not url:
        print("autoglm health: no NATS url and no running embedded engine found", file=sys.stderr)
        return 1
    args.nats_url = url
    nc, _ = await _open(args, timeout=args.timeout)
    try:
        health = Subjects(cfg.nats.subject_prefix).service("health")
        reply = await nc.request(health, b"", timeout=args.timeout)
    except Exception as exc:  # no responders / timeout: no healthy engine
        shown = redact_url(url)
        print(f"autoglm health: no engine answered on {shown}: {type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        await nc.close()
    report = orjson.loads(reply.data)
    print(report)
    if report.get("status") == "unhealthy":
        print(f"autoglm health: engine unhealthy: {report.get('failure')}", file=sys.stderr)
        return 1
    return 0


def _validate(args: argparse.Namespace) -> int:
    path = args.file or DEFAULT_CONFIG
    if not Path(path).is_file():  # one line (main's handler), not a report of one problem
        what = "is a directory, not a routing file" if Path(path).is_dir() else "no such file"
        raise ConfigError([f"{path}: {what}"])
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid", file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    routes = ", ".join(
        f"{r.modality}->{'+'.join([r.processor, *(a.processor for a in r.also)])}" for r in cfg.routes
    )
    print(
        f"{path}: ok ({routes}; aligner {cfg.aligner.mode} {cfg.aligner.window_ms} ms; glm {cfg.glm.backend})"
    )
    for name, why in sorted(REFUSED.items()):  # unused by any route, so only a note
        print(f"  note: processor {name!r} (no route uses it): {why}", file=sys.stderr)
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from engine.tools.demo import run_demo

    overrides = _overrides(args)
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)  # noqa: ASYNC240
    return await run_demo(
        with_overrides(_config(args.config), overrides),
        config_path=path,
        overrides=overrides,
        seconds=args.seconds,
        sources=args.sources,
        nats_url=args.nats_url,
        width=args.width,
        height=args.height,
        monitor_port=args.monitor,
    )


# -- arguments ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line, ``autoglm <command>: <what is wrong>``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text!r}")
    return value


def _not_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text!r}")
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, not {text!r}")
        return value

    return parse


def _speed(text: str) -> float | None:
    """``max`` (None: as fast as it goes) or X times the recorded pace."""
    if text == "max":
        return None
    try:
        return _positive(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (a positive number, 1 = as recorded, or max)") from None


def _since(text: str) -> datetime | None:
    from engine.tools.replay import parse_since

    try:
        return parse_since(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(
            "; ".join(exc.problems).removeprefix(f"--since {text!r}: ")
        ) from None


def _since_or_start(text: str) -> datetime:
    """:func:`_since`, with ``all`` as the epoch (the results stream's start)."""
    return _since(text) or datetime.fromtimestamp(0, UTC)


def _source(text: str) -> str:
    if not valid_source(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a source name: 1-64 of [A-Za-z0-9_-]")
    return text


def _prefix(text: str) -> str:
    try:
        updated(NatsConfig(), {"subject_prefix": text})
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a subject prefix: dot-separated tokens of [A-Za-z0-9_-]"
        ) from None
    return text


def _input_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def _media_url(text: str) -> str:
    """A URL (anything with a scheme) or a camera index as it is; a path must
    exist and not be a directory."""
    if "://" in text or text.isdigit():
        return text
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


_PORT = _int_in(0, 65535)


def _connection_options(parser: argparse.ArgumentParser, server: str) -> None:
    """What every tool that connects takes (read by :func:`_client_nats`)."""
    parser.add_argument("--auth-file", help="KEY=VALUE file of AUTOGLM_NATS_* settings, as --secure writes")
    parser.add_argument("--nats-url", help=f"{server} (or {NATS_URL_ENV})")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="autoglm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one object per line")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the engine until SIGINT/SIGTERM, then drain")
    run.add_argument("--config", help=f"routing file (default ./{DEFAULT_CONFIG})")
    run.add_argument("--nats-url", help=f"use this server instead of the embedded one (or {NATS_URL_ENV})")
    run.add_argument(
        "--secure",
        action="store_true",
        help="embedded server with generated users (producer, engine, reader); anonymous refused",
    )
    run.add_argument("--trace-file", help="append OpenTelemetry spans to this file as JSON lines")
    run.add_argument(
        "--workers",
        type=_int_in(1, 256),
        default=1,
        help="start K worker processes of this config, kept up by this one; the partitions spread "
        "over them (K > 1 needs JetStream; see docs/scaling.md)",
    )
    run.add_argument(
        "--metrics-port", type=_PORT, help="serve Prometheus /metrics on this port (worker i: PORT+i-1)"
    )

    pub = sub.add_parser(
        "publish",
        help="publish an image or a text, or stream a video, audio or text source (docs/sources.md)",
    )
    pub.add_argument("--source", required=True, type=_source, help="source name, 1-64 of [A-Za-z0-9_-]")
    what = pub.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", type=_input_file, help="a JPEG or PNG file")
    what.add_argument("--text", help="a UTF-8 string; - reads standard input, one event per line")
    what.add_argument(
        "--video",
        metavar="URL",
        type=_media_url,
        help="a video file or stream FFmpeg opens (rtsp://, udp://...), or a camera (/dev/video0, 0)",
    )
    what.add_argument(
        "--audio", metavar="URL", type=_media_url, help="an audio file or stream FFmpeg opens, as PCM chunks"
    )
    what.add_argument("--text-file", metavar="PATH", type=_input_file, help="a text file, one event per line")
    _connection_options(pub, "server to publish to")
    pub.add_argument("--config", help="read nats.url and the subject prefix from this file")
    pub.add_argument("--prefix", type=_prefix, help="subject prefix (default: --config's, else autoglm)")
    pub.add_argument(
        "--chunk-ms", type=_int_in(1, 3_600_000), default=100, help="audio chunk length (default 100)"
    )
    pub.add_argument("--id", help="Nats-Msg-Id for the event (streams: a prefix for each event's id)")
    pub.add_argument(
        "--wait", type=_not_negative, default=0.0, help="wait up to N s for the result or DLQ record"
    )
    pub.add_argument(
        "--claim-check",
        action="store_true",
        help="send the bytes through the Object Store even when they fit (automatic above max_payload)",
    )
    media = pub.add_argument_group("streams (--video, --audio, --text-file, --text -)")
    media.add_argument("--with-audio", action="store_true", help="--video: send its audio track too")
    media.add_argument("--fps", type=_positive, help="at most N frames a second (default: the stream's rate)")
    media.add_argument("--quality", type=_int_in(1, 100), default=90, help="JPEG quality (default 90)")
    media.add_argument("--raw", action="store_true", help="frames as raw BGR instead of JPEG")
    media.add_argument("--loop", action="store_true", help="a file: start again at its end, until Ctrl-C")
    pace = media.add_mutually_exclusive_group()
    pace.add_argument(
        "--realtime", action="store_true", help="a file: at its own rate (the default), dropping when slower"
    )
    pace.add_argument(
        "--as-fast-as-possible",
        action="store_true",
        help="a file: without pacing or dropping; timestamps still follow the file's",
    )
    media.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        help="seconds to open a stream and for each read (default 10)",
    )
    media.add_argument("--input-format", help="FFmpeg's input format (-f): alsa, mjpeg, mpegts...")
    media.add_argument("--follow", action="store_true", help="--text-file: keep reading what is appended")
    pub.add_argument("--traceparent", help="W3C trace context to continue (default: a new trace)")

    tl = sub.add_parser("tail", help="print results (and with --dlq rejections) as they arrive")
    tl.add_argument("--source", action="append", type=_source, help="only this source (repeat for more)")
    tl.add_argument("--dlq", action="store_true", help="rejections (DLQ and late records) too")
    tl.add_argument("--json", action="store_true", help="each record as published, one JSON object a line")
    _connection_options(tl, "server to read from")
    tl.add_argument("--config", help="read nats.url and the subject prefix from this file")
    tl.add_argument("--prefix", type=_prefix, help="subject prefix (default: --config's, else autoglm)")
    tl.add_argument(
        "--durable", type=_source, help="read the results stream through this named consumer (resumes)"
    )
    tl.add_argument("--from-start", action="store_true", help="read the results stream from its start")
    tl.add_argument(
        "--since",
        type=_since_or_start,
        help="read the results stream from: a duration ago (15m), an ISO time, or all",
    )
    tl.add_argument("--count", type=_int_in(1, 2**31), help="exit after N records")

    st = sub.add_parser("status", help="a live table of the engines found through NATS discovery")
    _connection_options(st, "server to look on")
    st.add_argument("--once", action="store_true", help="print the table once and exit")
    st.add_argument("--info", action="store_true", help="print each engine's $SRV.INFO reply (JSON) and exit")
    st.add_argument("--interval", type=_positive, default=2.0, help="seconds between refreshes")

    rl = sub.add_parser("reload", help="every engine found re-reads its routing file (like SIGHUP)")
    _connection_options(rl, "server to look on")
    rl.add_argument("--prefix", help="only the engines of this subject prefix")
    rl.add_argument("--timeout", type=_positive, default=60.0, help="seconds to wait for each engine")

    rp = sub.add_parser("replay", help="re-feed the recorded input stream through a fresh aligner")
    rp.add_argument(
        "--since", required=True, type=_since, help="all, a duration ago (15m, 2h), or an ISO time with zone"
    )
    rp.add_argument("--speed", type=_speed, default=None, help="X times the recorded pace, or max (default)")
    rp.add_argument("--out", help="write the JSON lines here (default stdout)")
    rp.add_argument("--config", help=f"routing file (default ./{DEFAULT_CONFIG} or built-in)")
    _connection_options(rp, "server holding the recording")

    hl = sub.add_parser("health", help="exit 0 if an engine answers its health endpoint")
    hl.add_argument("--config", help=f"routing file (default ./{DEFAULT_CONFIG} or built-in)")
    _connection_options(hl, "server to ask")
    hl.add_argument("--timeout", type=_positive, default=3.0, help="seconds (default 3)")

    mon = sub.add_parser("monitor", help="a live page of the engines, sources and rejections (read-only)")
    _connection_options(mon, "server to watch")
    mon.add_argument("--config", help="read nats settings and the subject prefix from this file")
    mon.add_argument("--prefix", type=_prefix, help="subject prefix (default: --config's, else autoglm)")
    mon.add_argument("--host", default="127.0.0.1", help="address to serve on (default loopback only)")
    mon.add_argument("--port", type=_PORT, default=8765, help="port to serve on (0: any free one)")
    mon.add_argument(
        "--secure",
        action="store_true",
        help="connect as the reader that `run --secure` wrote (no input frames: it may not read inputs)",
    )

    val = sub.add_parser("validate", help="check a routing file; exit 2 with each problem")
    val.add_argument("file", nargs="?", help=f"default ./{DEFAULT_CONFIG}")

    sub.add_parser("plugins", help="list every processor (package, version, modalities, origin)")

    md = sub.add_parser("models", help="the models each engine's routes have loaded, with their versions")
    _connection_options(md, "server to look on")

    ab = sub.add_parser("ab", help="A/B variants: `autoglm ab report`")
    ab_sub = ab.add_subparsers(dest="ab_command", required=True)
    abr = ab_sub.add_parser("report", help="per route and variant, from the results stream")
    abr.add_argument(
        "--since", type=_since, default=None, help="all (default), a duration ago (15m), an ISO time"
    )
    abr.add_argument(
        "--config", help=f"routing file: prefix and stream (default ./{DEFAULT_CONFIG} or built-in)"
    )
    _connection_options(abr, "server holding the results")

    ex = sub.add_parser("export", help="a route's model as ONNX (optionally int8), checked against torch")
    ex.add_argument(
        "--route", default="image", help="image (the cnn route) or text (the minilm route); default image"
    )
    ex.add_argument("--config", help=f"routing file (default ./{DEFAULT_CONFIG} or built-in)")
    ex.add_argument("--out", default="models", help="directory to write into (default models/)")
    ex.add_argument(
        "--int8",
        nargs="?",
        const="static",
        choices=["static", "dynamic"],
        default=None,
        help="also write an int8 copy: static (calibrated; default) or dynamic",
    )
    ex.add_argument("--calibrate", help="directory of JPEG/PNG frames to check and calibrate on")
    ex.add_argument("--min-cosine", type=float, default=0.99, help="fp32 threshold (default 0.99)")
    ex.add_argument("--min-cosine-int8", type=float, default=0.97, help="int8 threshold (default 0.97)")
    ex.add_argument("--samples", type=_int_in(2, 4096), default=32, help="frames to compare on (default 32)")

    di = sub.add_parser("distill", help="train a small student CNN to match a teacher on your frames")
    di.add_argument("--teacher", default="resnet50", choices=list(_CNNS))
    di.add_argument("--student", default="mobilenet_v3_small", choices=list(_CNNS))
    di.add_argument("--frames", required=True, help="directory of JPEG/PNG frames (a fifth held out)")
    di.add_argument("--epochs", type=_int_in(1, 10_000), default=5)
    di.add_argument("--out", default="models", help="directory to write into (default models/)")
    di.add_argument("--teacher-weights", choices=["random", "imagenet"], default="imagenet")
    di.add_argument("--teacher-weights-path", help="the teacher's torchvision checkpoint")
    di.add_argument("--alpha", type=float, default=0.5, help="weight of CE against KL (default 0.5)")
    di.add_argument("--temperature", type=_positive, default=4.0, help="softening T (default 4)")
    di.add_argument("--input-size", type=_int_in(32, 1024), default=224)
    di.add_argument("--resume", action="store_true", help="go on from the last finished epoch")

    demo = sub.add_parser("demo", help="embedded server + engine + a synthetic multimodal stream")
    demo.add_argument("--seconds", type=_positive, default=10.0)
    demo.add_argument("--sources", type=_int_in(1, 10_000), default=2)
    demo.add_argument("--config", help=f"routing file (default ./{DEFAULT_CONFIG} or built-in)")
    demo.add_argument("--nats-url", help="use this server instead of the embedded one")
    demo.add_argument("--metrics-port", type=_PORT, help="serve Prometheus /metrics on this port (0: any)")
    demo.add_argument("--trace-file", help="append OpenTelemetry spans (producer and engine) as JSON lines")
    demo.add_argument("--width", type=_int_in(16, 7680), default=320, help="frame width (default 320)")
    demo.add_argument("--height", type=_int_in(16, 4320), default=240, help="frame height (default 240)")
    demo.add_argument(
        "--monitor",
        type=_PORT,
        nargs="?",
        const=8765,
        metavar="PORT",
        help="serve the live page (autoglm monitor) beside the demo on this port (default 8765)",
    )
    return p


def _export(args: argparse.Namespace) -> int:
    from engine.tools.export import export_image, image_params

    config = _config(args.config)
    thresholds = {"min_cosine": args.min_cosine, "min_cosine_int8": args.min_cosine_int8}
    if args.route == "text":  # int8 is dynamic for a transformer (engine.tools.export_text)
        from engine.tools.export_text import export_text, text_params

        written = export_text(
            text_params(config),
            Path(args.out),
            int8=args.int8 is not None,
            samples=args.samples,
            **thresholds,
        )
    else:
        written = export_image(
            image_params(config, args.route),
            Path(args.out),
            int8=args.int8,
            calibrate=Path(args.calibrate) if args.calibrate else None,
            samples=args.samples,
            **thresholds,
        )
    for e in written:
        f = e.fidelity
        top1 = "" if math.isnan(f.top1) else f", top-1 agreement {f.top1:.1%}"
        print(
            f"{e.path} ({e.precision}, {e.version}): cosine to torch mean {f.cosine_mean:.4f} "
            f"min {f.cosine_min:.4f}{top1} on {f.samples} samples"
        )
    return 0


_CNNS = ("mobilenet_v3_small", "resnet18", "resnet50", "efficientnet_b0")


def _distill(args: argparse.Namespace) -> int:
    from engine.tools.distill import distill

    r = distill(
        args.teacher,
        args.student,
        Path(args.frames),
        Path(args.out),
        epochs=args.epochs,
        alpha=args.alpha,
        temperature=args.temperature,
        teacher_weights=args.teacher_weights,
        teacher_weights_path=args.teacher_weights_path,
        input_size=args.input_size,
        resume=args.resume,
    )
    for when, e in (("untrained", r.before), ("distilled", r.after)):
        print(
            f"{when}: embedding cosine to the teacher {e.cosine:.4f}, top-1 agreement {e.top1:.1%}, "
            f"student {e.student_items_s:.0f} items/s vs teacher {e.teacher_items_s:.0f}"
        )
    print(f'{r.path} ({r.version}); route: model = {args.student!r}, weights = "imagenet", weights_path')
    return 0


def _fail(command: str, message: str) -> None:
    """One line on stderr, whatever the message holds."""
    print(f"autoglm {command}: {' '.join(message.split())}", file=sys.stderr)


def _os_error(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(str(args.log_level), args.log_format)
    started = time.monotonic()
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "plugins":
            from engine.tools.plugins import print_plugins

            return print_plugins()
        if args.command == "export":
            return _export(args)
        if args.command == "distill":
            return _distill(args)
        if args.command in ("run", "demo", "replay"):
            _quiet_libraries()
        runner = {
            "run": _run,
            "publish": _publish,
            "tail": _tail,
            "demo": _demo,
            "status": _status,
            "health": _health,
            "reload": _reload,
            "replay": _replay,
            "models": _models,
            "ab": _ab_report,
            "monitor": _monitor,
        }[args.command]
        return _run_async(runner(args))
    except ConfigError as exc:  # the command line or a file it names: the user's to fix
        text = "; ".join(exc.problems)
        _fail(args.command, f"{exc.path}: {text}" if exc.path and exc.path not in text else text)
        return 2
    except OSError as exc:  # a path given on the command line (unreadable, unwritable, a directory)
        _fail(args.command, _os_error(exc))
        return 2
    except AutoGLMError as exc:  # it failed while working (NATS unreachable, a bad image...)
        _fail(args.command, str(exc))
        return 1
    except KeyboardInterrupt:
        print(f"autoglm: interrupted after {time.monotonic() - started:.1f} s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
