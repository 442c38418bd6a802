from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from engine.observe.logs import JsonFormatter
from tests.conftest import collect, send, spawn_engine

ROOT = Path(__file__).resolve().parent.parent


def test_json_lines_carry_context_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "autoglm.engine", logging.ERROR, __file__, 1, "batch %s failed", ("b1",), sys.exc_info()
        )
    record.source = "cam1"
    record.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    line = orjson.loads(JsonFormatter().format(record))
    assert line["level"] == "error" and line["event"] == "batch b1 failed"
    assert line["source"] == "cam1" and line["trace_id"].startswith("4bf9")
    assert line["time"].endswith("+00:00") and "ValueError: boom" in line["exc"]


async def test_engine_logs_json_without_payload_bytes(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\n[[routes]]\nmodality = "text"\nprocessor = "minilm"\n'
    )
    dlq = await collect(nc, f"{prefix}.dlq.>")
    proc = await spawn_engine(
        "--config", str(cfg), "--nats-url", nats_url, options=("--log-level", "INFO", "--log-format", "json")
    )
    await send(nc, prefix, "cam1", "text", b"SECRET-PAYLOAD \xff", time.time_ns(), event_id="bad-1")
    await dlq.wait_for(1)  # the engine logs a rejection before it publishes the record
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = [orjson.loads(x) for x in err.decode().splitlines() if x.startswith("{")]
    assert lines and all({"time", "level", "logger", "event"} <= line.keys() for line in lines)
    [rejected] = [x for x in lines if x.get("reason") == "invalid_utf8"]
    assert rejected["source"] == "cam1" and rejected["subject"] == f"{prefix}.in.cam1.text"
    assert b"SECRET-PAYLOAD" not in err
