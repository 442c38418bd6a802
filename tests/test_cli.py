"""The ``autoglm`` command as a user runs it: real processes, real server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson
import soundfile

from engine.runtime.engine import Engine
from engine.tools.publish import sync_with_server
from tests.conftest import collect, engine_health, make_config, send, spawn_engine

ROOT = Path(__file__).resolve().parent.parent
AUTOGLM = [sys.executable, "-m", "engine.tools.cli"]


async def run_cli(*args: str, timeout: float = 120, cwd: Path = ROOT) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *AUTOGLM, *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_demo_runs_and_accounts_for_every_event(tmp_path: Path) -> None:
    cfg = tmp_path / "routing.toml"
    cfg.write_text(
        (ROOT / "routing.toml").read_text().replace('data_dir = ".autoglm"', f'data_dir = "{tmp_path}"')
    )
    spans = tmp_path / "spans.jsonl"
    code, out, err = await run_cli(
        "demo", "--seconds", "3", "--sources", "2", "--config", str(cfg), "--trace-file", str(spans),
        "--monitor", "0",
    )  # fmt: skip
    assert code == 0, err + out
    assert "autoglm demo: monitor on http://127.0.0.1:" in out  # --monitor: the page beside it
    assert "autoglm demo summary (3 s, 2 source(s))" in out
    sent = next(line for line in out.splitlines() if "events published" in line)
    assert "image 180" in sent and "audio 60" in sent and "text 6" in sent
    assert "rejected (DLQ)" in out and "p99" in out
    counted = next(line for line in out.splitlines() if "accounted for" in line).split()
    assert counted[2] == counted[4]  # "accounted for N of N events"
    # --trace-file: each fused window continues a producer's trace (producer -> engine -> result)
    records = [orjson.loads(line) for line in spans.read_text().splitlines()]
    producers = {
        r["context"]["span_id"]: r["context"]["trace_id"] for r in records if r["name"] == "demo.publish"
    }
    windows = [r for r in records if r["name"] == "autoglm.window"]
    assert windows and all(producers[w["parent_id"]] == w["context"]["trace_id"] for w in windows)


async def test_publish_text_image_and_audio_and_wait_for_results(
    nats_url: str, nc: Any, prefix: str, tmp_path: Path
) -> None:
    engine = Engine(make_config(prefix, aligner={"idle_timeout_ms": 200}))
    await engine.start(nats_url)
    try:
        code, out, err = await run_cli(
            "publish",
            "--nats-url",
            nats_url,
            "--prefix",
            prefix,
            "--source",
            "cli",
            "--text",
            "héllo",
            "--wait",
            "5",
        )
        assert code == 0, err
        assert f"published 1 text event(s) on {prefix}.in.cli.text" in out
        assert f"{prefix}.out.cli" in out and '"héllo"' not in out  # passthrough: byte count only
        img = tmp_path / "frame.png"
        cv2.imwrite(str(img), np.zeros((8, 8, 3), np.uint8))
        code, out, _ = await run_cli(
            "publish", "--nats-url", nats_url, "--prefix", prefix, "--source", "cli", "--image", str(img)
        )
        assert code == 0 and "(image/png)" in out
        wav = tmp_path / "a.wav"
        soundfile.write(str(wav), np.zeros(16_000 * 35 // 100), 16_000)
        code, out, _ = await run_cli(
            "publish", "--nats-url", nats_url, "--prefix", prefix, "--source", "cli", "--audio", str(wav)
        )
        assert code == 0 and "published 4 audio event(s)" in out  # 350 ms in 100 ms chunks
        bad = tmp_path / "x.txt"
        bad.write_text("not an image")
        code, _, err = await run_cli(
            "publish", "--nats-url", nats_url, "--source", "cli", "--image", str(bad)
        )
        assert code == 1 and "not a JPEG or PNG" in err
    finally:
        await engine.stop()


async def test_publish_without_a_server_fails_clearly() -> None:
    env_url = os.environ.pop("AUTOGLM_NATS_URL", None)
    try:
        code, _, err = await run_cli(
            "publish", "--source", "x", "--text", "t", "--nats-url", "nats://127.0.0.1:1"
        )
        assert code == 1 and "cannot connect to NATS" in err
    finally:
        if env_url:
            os.environ["AUTOGLM_NATS_URL"] = env_url


def _held_window_config(path: Path, prefix: str, durable: bool, idle_ms: int = 60000) -> Path:
    path.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\ndurable = {str(durable).lower()}\n'
        f"[aligner]\nwindow_ms = 60000\nidle_timeout_ms = {idle_ms}\n"
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    return path


async def test_run_drains_on_sigterm_in_core_mode(
    nats_url: str, nc: Any, prefix: str, tmp_path: Path
) -> None:
    """Core mode: nothing would deliver the events again, so SIGTERM publishes open windows."""
    cfg = _held_window_config(tmp_path / "r.toml", prefix, durable=False)
    out = await collect(nc, f"{prefix}.out.>")
    proc = await spawn_engine("--config", str(cfg), "--nats-url", nats_url)
    await send(nc, prefix, "cam", "text", b"held in a 60 s window", time.time_ns(), event_id="held")
    await engine_health(nc, prefix, lambda h: h["open_windows"] == 1)
    assert out.items == []  # the window is still open
    proc.send_signal(signal.SIGTERM)
    rest, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert b"stopped; 1 results" in rest
    [result] = await out.wait_for(1)
    assert result["events"] == {"text": ["held"]}


async def test_sigterm_in_durable_mode_leaves_open_windows_to_the_next_engine(
    nats_url: str, nc: Any, prefix: str, tmp_path: Path
) -> None:
    """A window published early at shutdown and rebuilt after the restart used to
    get the same result id, so the second part was dropped as a duplicate and its
    events lost. Now the window stays unacked and the next engine builds it whole."""
    cfg = _held_window_config(tmp_path / "r.toml", prefix, durable=True)
    out = await collect(nc, f"{prefix}.out.>")
    proc = await spawn_engine("--config", str(cfg), "--nats-url", nats_url)
    t0 = time.time_ns()
    await send(nc, prefix, "cam", "text", b"before the restart", t0, event_id="cam-before")
    await engine_health(nc, prefix, lambda h: h["open_windows"] == 1)
    proc.send_signal(signal.SIGTERM)
    rest, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert b"stopped; 0 results" in rest
    cfg = _held_window_config(tmp_path / "r.toml", prefix, durable=True, idle_ms=500)
    proc = await spawn_engine("--config", str(cfg), "--nats-url", nats_url)
    await send(nc, prefix, "cam", "text", b"after the restart", t0 + 1000, event_id="cam-after")
    await out.wait_events({"cam-before", "cam-after"})
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.communicate(), 60)
    assert [body["events"] for _, _, body in out.items] == [{"text": ["cam-before", "cam-after"]}]


async def test_health_finds_an_embedded_engine_and_fails_without_one(tmp_path: Path) -> None:
    """What the container's HEALTHCHECK runs."""
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'[nats]\ndata_dir = "{tmp_path}"\nsubject_prefix = "hc"\n'
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    code, _, err = await run_cli("health", "--config", str(cfg), "--timeout", "1")
    assert code == 1 and "no NATS url and no running embedded engine" in err
    proc = await spawn_engine("--config", str(cfg))
    try:
        code, out, err = await run_cli("health", "--config", str(cfg))
        assert code == 0, err
        assert "'status': 'ok'" in out
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    code, _, err = await run_cli("health", "--config", str(cfg), "--timeout", "1")
    assert code == 1  # the URL file is left behind, but nothing answers there now


async def test_publish_takes_the_prefix_from_its_config(
    nats_url: str, nc: Any, prefix: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\n[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    sub = await nc.subscribe(f"{prefix}.in.>")
    await sync_with_server(nc)
    code, out, err = await run_cli(
        "publish", "--nats-url", nats_url, "--config", str(cfg), "--source", "cfg", "--text", "hi"
    )
    assert code == 0, err
    assert f"on {prefix}.in.cfg.text" in out
    msg = await sub.next_msg(timeout=5)
    assert msg.subject == f"{prefix}.in.cfg.text" and msg.data == b"hi"


async def test_every_mistake_on_the_command_line_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    """Each of these printed a traceback, busy-looped or was taken as given. Now: exit code 2,
    ``autoglm <command>: <what is wrong>`` on one line, no traceback, nothing started."""
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    strict = tmp_path / "strict.toml"
    strict.write_text(
        '[aligner]\nwindow_ms = "1000"\n[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    dead = "nats://127.0.0.1:1"  # would fail with exit code 1 if anything got as far as connecting
    pub = ("publish", "--nats-url", dead)
    cases: list[tuple[tuple[str, ...], str]] = [
        ((*pub, "--source", "x", "--image", str(tmp_path / "missing.png")), "no such file"),
        ((*pub, "--source", "x", "--image", str(a_dir)), "is a directory"),
        ((*pub, "--source", "x", "--audio", str(a_dir)), "is a directory"),
        ((*pub, "--source", "a.b", "--text", "t"), "'a.b' is not a source name"),
        ((*pub, "--source", ">", "--text", "t"), "'>' is not a source name"),
        ((*pub, "--source", "x" * 65, "--text", "t"), "is not a source name"),
        ((*pub, "--source", "x", "--prefix", "a.>", "--text", "t"), "is not a subject prefix"),
        ((*pub, "--source", "x", "--chunk-ms", "0", "--text", "t"), "--chunk-ms: must be 1.."),
        ((*pub, "--source", "x", "--wait", "nan", "--text", "t"), "--wait: must be a finite number"),
        (("validate", str(a_dir)), "is a directory"),
        (("validate", str(tmp_path / "missing.toml")), "no such file"),
        (("run", "--config", str(a_dir)), "not a file but a directory"),
        (("run", "--config", str(strict)), 'aligner.window_ms = "1000": must be an integer, not a string'),
        (("replay", "--since", "99999999999d", "--nats-url", dead), "--since: too far back"),
        (("replay", "--since", "yesterday", "--nats-url", dead), "--since: use all, a duration"),
        (
            ("replay", "--since", "all", "--nats-url", dead, "--out", str(a_file / "o.jsonl")),
            "Not a directory",
        ),
        (("replay", "--since", "all", "--nats-url", dead, "--out", str(a_dir)), "Is a directory"),
        *(
            (("replay", "--since", "all", "--nats-url", dead, "--speed", v), f"--speed: must be {why}")
            for v, why in (("nan", "a finite"), ("inf", "a finite"), ("-1", "> 0"), ("0", "> 0"))
        ),
        (("reload", "--nats-url", dead, "--timeout", "-1"), "--timeout: must be > 0"),
        (("status", "--nats-url", dead, "--interval", "0"), "--interval: must be > 0"),
        (("status", "--nats-url", dead, "--interval", "inf"), "--interval: must be a finite number"),
        (("health", "--nats-url", dead, "--timeout", "nan"), "--timeout: must be a finite number"),
        (("demo", "--metrics-port", "70000"), "--metrics-port: must be 0..65535"),
        (("demo", "--metrics-port", "-1"), "--metrics-port: must be 0..65535"),
        (("demo", "--monitor", "70000"), "--monitor: must be 0..65535"),
        (("monitor", "--port", "-1"), "--port: must be 0..65535"),
        (("monitor", "--secure"), "reader.env (start the engine with `autoglm run --secure`)"),
        (("demo", "--seconds", "nan"), "--seconds: must be a finite number"),
    ]
    slots = asyncio.Semaphore(4)

    async def check(args: tuple[str, ...], expected: str) -> str | None:
        async with slots:
            code, out, err = await run_cli(*args, cwd=tmp_path, timeout=60)
        ok = (
            code == 2
            and err.count("\n") == 1
            and err.startswith(f"autoglm {args[0]}: ")
            and expected in err
            and "Traceback" not in err + out
        )
        return None if ok else f"{' '.join(args)} -> exit {code}, stderr {err!r}"

    failures = [f for f in await asyncio.gather(*(check(*c) for c in cases)) if f]
    assert not failures, "\n".join(failures)
    assert not (a_file.parent / "o.jsonl").exists() and list(a_dir.iterdir()) == []


async def test_publish_reports_an_id_the_input_stream_already_held(
    nats_url: str, nc: Any, prefix: str
) -> None:
    """Nats-Msg-Id deduplication covers the whole input stream: two sources that
    number their events alike lose each other's. The publisher must say so."""
    engine = Engine(make_config(prefix, nats={"subject_prefix": prefix, "durable": True}))
    await engine.start(nats_url)
    try:
        common = ("publish", "--nats-url", nats_url, "--prefix", prefix, "--text", "hi", "--id", "0")
        code, _, err = await run_cli(*common, "--source", "cam1")
        assert code == 0, err
        code, _, err = await run_cli(*common, "--source", "cam2")
        assert code == 1 and "already held event id(s) 0" in err and "unique across every source" in err
        # Without --id the ids name their source, so the same call twice is two events.
        for _ in range(2):
            code, _, err = await run_cli(*common[:-2], "--source", "cam3")
            assert code == 0, err
    finally:
        await engine.stop()
