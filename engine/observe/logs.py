"""Logging set-up: plain text for people, one JSON object per line for machines.

JSON records carry ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``event``
(the message) and, when the call site gives them, ``source`` and
``trace_id``. Payload bytes and secrets are never passed to a logger.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Literal

import orjson

LogFormat = Literal["text", "json"]
_CONTEXT = ("source", "trace_id", "subject", "reason")


class JsonFormatter(logging.Formatter):
    """One JSON line per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="microseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key in _CONTEXT:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str = "WARNING", fmt: LogFormat = "text") -> None:
    """Configure the root logger once, for the CLI."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))
