"""``autoglm``: run, publish, tail, status, reload, replay, health, validate, plugins, models, ab, demo.

A mistake on the command line or in a file it names (a flag out of range, a
missing file, an invalid routing file) ends with one line on stderr,
``autoglm <command>: <what is wrong>``, and exit code 2; a failure while
working (NATS unreachable, a file that is not an image) with exit code 1.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Coroutine
from typing import Any

from engine.contracts.errors import AutoGLMError, ConfigError
from engine.observe.logs import setup_logging
from engine.tools.offline import cmd_distill, cmd_export, cmd_replay, cmd_validate
from engine.tools.parser import build_parser
from engine.tools.queries import cmd_ab_report, cmd_health, cmd_models, cmd_reload, cmd_status
from engine.tools.runner import cmd_demo, cmd_monitor, cmd_run
from engine.tools.traffic import cmd_publish, cmd_tail


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
            return cmd_validate(args)
        if args.command == "plugins":
            from engine.tools.plugins import print_plugins

            return print_plugins()
        if args.command == "export":
            return cmd_export(args)
        if args.command == "distill":
            return cmd_distill(args)
        if args.command in ("run", "demo", "replay"):
            _quiet_libraries()
        runner = {
            "run": cmd_run,
            "publish": cmd_publish,
            "tail": cmd_tail,
            "demo": cmd_demo,
            "status": cmd_status,
            "health": cmd_health,
            "reload": cmd_reload,
            "replay": cmd_replay,
            "models": cmd_models,
            "ab": cmd_ab_report,
            "monitor": cmd_monitor,
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
