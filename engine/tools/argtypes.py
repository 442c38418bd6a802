"""The command line's value types: each refuses a bad value with one line saying why."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from engine.config.models import (
    NATS_URL_ENV,
    NatsConfig,
    updated,
)
from engine.contracts.errors import ConfigError
from engine.contracts.subjects import valid_source

CNNS = ("mobilenet_v3_small", "resnet18", "resnet50", "efficientnet_b0")


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def positive(text: str) -> float:
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text!r}")
    return value


def not_negative(text: str) -> float:
    value = number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text!r}")
    return value


def int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, not {text!r}")
        return value

    return parse


def speed(text: str) -> float | None:
    """``max`` (None: as fast as it goes) or X times the recorded pace."""
    if text == "max":
        return None
    try:
        return positive(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (a positive number, 1 = as recorded, or max)") from None


def since(text: str) -> datetime | None:
    from engine.tools.replay import parse_since

    try:
        return parse_since(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(
            "; ".join(exc.problems).removeprefix(f"--since {text!r}: ")
        ) from None


def since_or_start(text: str) -> datetime:
    """:func:`since`, with ``all`` as the epoch (the results stream's start)."""
    return since(text) or datetime.fromtimestamp(0, UTC)


def source(text: str) -> str:
    if not valid_source(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a source name: 1-64 of [A-Za-z0-9_-]")
    return text


def prefix(text: str) -> str:
    try:
        updated(NatsConfig(), {"subject_prefix": text})
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a subject prefix: dot-separated tokens of [A-Za-z0-9_-]"
        ) from None
    return text


def input_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def media_url(text: str) -> str:
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


PORT = int_in(0, 65535)


def connection_options(parser: argparse.ArgumentParser, server: str) -> None:
    """What every tool that connects takes (read by :func:`client_nats`)."""
    parser.add_argument("--auth-file", help="KEY=VALUE file of AUTOGLM_NATS_* settings, as --secure writes")
    parser.add_argument("--nats-url", help=f"{server} (or {NATS_URL_ENV})")
