"""The committed AsyncAPI document matches the code, and the code's messages match it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from engine.contracts.errors import REASONS
from engine.contracts.records import Rejection, Result
from engine.runtime.engine import Engine
from engine.wire.asyncapi import document
from tests.conftest import collect, make_config, send

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "asyncapi.json"


def test_committed_document_is_current() -> None:
    assert json.loads(DOC.read_text()) == json.loads(document()), (
        "docs/asyncapi.json is stale: "
        "python -m engine.wire.asyncapi | python -m json.tool > docs/asyncapi.json"
    )
    spec = json.loads(document())
    assert set(spec["channels"]) == {"input", "result", "rejected", "late"}
    assert set(spec["components"]["schemas"]["Rejection"]["properties"]["reason"]["enum"]) == REASONS


async def test_published_messages_validate_against_the_schemas(nc: Any, nats_url: str, prefix: str) -> None:
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(make_config(prefix))
    await engine.start(nats_url)
    await send(nc, prefix, "cam", "text", b"ok", time.time_ns(), event_id="good")
    await send(nc, prefix, "cam", "text", b"x", time.time_ns(), content_type="video/mp4", event_id="bad")
    await nc.flush()
    [result] = await out.wait_for(1)
    [record] = await dlq.wait_for(1)
    await engine.stop()
    assert Result.model_validate(result).events == {"text": ["good"]}
    assert Rejection.model_validate(record).reason == "unsupported_content_type"


async def test_the_documented_faststream_command_writes_the_committed_document(tmp_path: Path) -> None:
    """docs/wire.md's ``faststream docs gen engine.wire.asyncapi:app`` needs ``faststream[cli]``
    (typer), which no dependency declared; the dev extra does now."""
    out = tmp_path / "asyncapi.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "faststream", "docs", "gen", "engine.wire.asyncapi:app", "--out", str(out),
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, (stdout + stderr).decode()
    assert json.loads(out.read_text()) == json.loads(DOC.read_text())
