"""The README's promises, run as written."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from engine.runtime.engine import Engine
from tests.conftest import make_config

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    head = README.splitlines()[:10]
    assert any(line.startswith("make demo") for line in head)
    assert any(line.startswith("make test") for line in head)


async def test_the_plain_nats_py_example_gets_a_result_and_a_dlq_record(nats_url: str) -> None:
    code = re.search(r"### Publishing from any NATS client\n\n```python\n(.*?)```", README, re.S)
    assert code is not None
    script = code.group(1).replace("nats://127.0.0.1:4222", nats_url)
    routes = [{"modality": "text", "processor": "minilm"}]
    engine = Engine(
        make_config("autoglm", routes=routes, aligner={"window_ms": 1000, "idle_timeout_ms": 1000})
    )
    await engine.start(nats_url)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await engine.stop()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert any(line.startswith("autoglm.out.kitchen ") and "kitchen-caption-1" in line for line in lines)
    assert any(line.startswith("autoglm.dlq.kitchen ") and '"invalid_utf8"' in line for line in lines)
