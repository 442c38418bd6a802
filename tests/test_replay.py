"""autoglm replay: the recorded input stream through a fresh aligner, same events -> same bytes."""

from __future__ import annotations

import asyncio
import io
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.config.models import load_config, parse_config
from engine.contracts.errors import ConfigError
from engine.pipeline.router import RateLimiter
from engine.runtime.build import build_routes
from engine.runtime.engine import Engine
from engine.tools.replay import Replayer, parse_since, replay
from engine.wire.codec import encode_headers
from tests.conftest import ROOT, collect, eventually, send, srv_stats

MS = 1_000_000


def test_since_accepts_all_durations_and_zoned_times_only() -> None:
    now = 1_800_000_000.0
    assert parse_since("all") is None
    assert parse_since("15m", now) == datetime.fromtimestamp(now - 900, UTC)
    assert parse_since("2026-11-29T10:00:00Z") == datetime(2026, 11, 29, 10, tzinfo=UTC)
    with pytest.raises(ConfigError, match="time zone"):
        parse_since("2026-11-29T10:00:00")
    with pytest.raises(ConfigError, match="duration"):
        parse_since("yesterday")


def routing(prefix: str) -> str:
    return (
        f'[nats]\nsubject_prefix = "{prefix}"\ndurable = true\n'
        "[aligner]\nwindow_ms = 50\nidle_timeout_ms = 300\n"
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
        '[[routes]]\nmodality = "image"\nprocessor = "passthrough"\n'
    )


def frames(data: bytes) -> list[dict[str, Any]]:
    return [r for r in map(orjson.loads, data.splitlines()) if "rejected" not in r]


async def record(
    nc: Any, nats_url: str, prefix: str, cfg_path: Path
) -> tuple[list[dict[str, Any]], set[str]]:
    """Run the engine in durable mode over a small stream; return its results and the sent ids."""
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(load_config(cfg_path, env={}))
    await engine.start(nats_url)
    assert (await srv_stats(nc, prefix))["durable"]  # durable: the inputs are recorded
    base = time.time_ns() // (50 * MS) * 50 * MS
    sent = set()
    for i in range(40):
        for src in ("a", "b"):
            mod = "text" if i % 2 else "image"
            eid = f"{src}-{i}"
            sent.add(eid)
            await send(nc, prefix, src, mod, b"x" * (i + 1), base + i * 10 * MS, event_id=eid)
        # Pacing, not synchronisation: the recording spans 0.4 s of stream time,
        # which the paced replay below must take as long as.
        await asyncio.sleep(0.01)
    await send(nc, prefix, "a", "text", b"bad", base + 400 * MS, content_type="video/mp4", event_id="bad")
    await send(nc, prefix, "b", "text", b"no id", base + 400 * MS)  # the engine names it js<seq>
    await nc.flush()

    def all_in() -> bool:
        ids = set(out.event_ids())
        return sent <= ids and len(ids - sent) == 1  # + the event without an id

    # every window closed on the idle timeout (a durable stop leaves open ones unacked)
    await out.wait_until(all_in, "all 81 events in results")
    await dlq.wait_for(1)
    await engine.stop()
    js = nc.jetstream()

    async def recorded() -> bool:  # the mirror follows the input stream asynchronously
        return bool((await js.stream_info(f"{prefix.upper()}_REC")).state.messages == 82)

    await eventually(recorded, "82 inputs in the recording")
    return [body for _, _, body in out.items], sent


@pytest.mark.parametrize("partitions", [1, 3])
async def test_replay_is_deterministic_and_matches_the_live_run(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path, partitions: int
) -> None:
    """With partitions, the recording holds the subjects as the transform stored them."""
    cfg_path = tmp_path / "routing.toml"
    cfg_path.write_text(
        routing(prefix).replace("durable = true\n", f"durable = true\npartitions = {partitions}\n")
    )
    live, sent = await record(nc, nats_url, prefix, cfg_path)
    first = await nc.jetstream().get_msg(f"{prefix.upper()}_REC", seq=1)
    assert first.subject.startswith(f"{prefix}.part." if partitions > 1 else f"{prefix}.in.")
    cfg = load_config(cfg_path, env={})
    runs = []
    for _ in range(2):
        buf = io.BytesIO()
        stats = await replay(nc, cfg, None, None, buf)
        runs.append(buf.getvalue())
    assert runs[0] == runs[1]  # same events -> same bytes
    assert stats.read == 82 and stats.rejected == {"unsupported_content_type": 1}
    replayed = frames(runs[0])
    fused = {e for r in replayed for ids in r["events"].values() for e in ids}
    assert sent <= fused and len(fused) == len(sent) + 1  # + the event without an id
    key = lambda r: (r["source"], r["window"]["start_ns"])  # noqa: E731
    # the live engine and the replay cut the same windows with the same events
    assert sorted((key(r), r["events"]) for r in live) == sorted((key(r), r["events"]) for r in replayed)
    rejected = [r["rejected"] for r in map(orjson.loads, runs[0].splitlines()) if "rejected" in r]
    assert [(r["event_id"], r["reason"]) for r in rejected] == [("bad", "unsupported_content_type")]

    # from a time after the recording: nothing
    empty = io.BytesIO()
    later = datetime.fromtimestamp(time.time() + 60, UTC)
    assert (await replay(nc, cfg, later, None, empty)).read == 0 and empty.getvalue() == b""

    # paced at the recorded rate: the same bytes, and it takes about as long as the recording did
    paced = io.BytesIO()
    t0 = time.monotonic()
    await replay(nc, cfg, None, 1.0, paced)
    assert paced.getvalue() == runs[0] and time.monotonic() - t0 >= 0.35


async def test_replay_command_writes_json_lines(nc: Any, nats_url: str, prefix: str, tmp_path: Path) -> None:
    cfg_path = tmp_path / "routing.toml"
    cfg_path.write_text(routing(prefix))
    await record(nc, nats_url, prefix, cfg_path)
    out = tmp_path / "replay.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.tools.cli", "replay", "--since", "10m", "--config", str(cfg_path),
        "--nats-url", nats_url, "--out", str(out), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "82 events read" in err.decode() and "unsupported_content_type 1" in err.decode()
    assert len(frames(out.read_bytes())) >= 16


async def test_replay_without_a_recording_says_so(nc: Any, nats_url: str, tmp_path: Path) -> None:
    cfg_path = tmp_path / "routing.toml"
    cfg_path.write_text(routing("never_recorded"))
    with pytest.raises(Exception, match="no recorded input stream NEVER_RECORDED_REC"):
        await replay(nc, load_config(cfg_path, env={}), None, None, io.BytesIO())


def replayed(routes: list[dict[str, Any]], messages: list[tuple[str, int, str]]) -> list[dict[str, Any]]:
    """Feed (subject, timestamp, event id) through a Replayer; its output lines."""
    cfg = parse_config(
        {
            "nats": {"subject_prefix": "r"},
            "routes": routes,
            "aligner": {"window_ms": 100, "allowed_lateness_ms": 0, "idle_timeout_ms": 300},
        },
        env={},
    )
    out = io.BytesIO()
    r = Replayer(cfg, out)
    for i, (subject, ts, eid) in enumerate(messages):
        r.feed(subject, encode_headers(ts, "text/plain", event_id=eid), b"x", f"js{i + 1}")
    r.finish()
    r.close()
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def fused_of(lines: list[dict[str, Any]]) -> list[str]:
    return sorted(e for rec in lines if "events" in rec for g in rec["events"].values() for e in g)


T = 1_800_000_000_000_000_000


def test_replay_fuses_every_event_whatever_the_live_queue_limits() -> None:
    """A queue smaller than a batch parks (complete) or drops (real_time) live;
    replay runs at its own pace: it runs what is queued instead, losing nothing."""
    for intake in ("complete", "real_time"):
        batch = {"max_batch_size": 8, "max_wait_ms": 1000, "max_queue": 1}
        route = {"modality": "text", "processor": "passthrough", "intake": intake, "batch": batch}
        lines = replayed([route], [("r.in.cam.text", T + i * 10 * MS, f"e{i}") for i in range(4)])
        assert fused_of(lines) == ["e0", "e1", "e2", "e3"], (intake, lines)


def test_replay_skips_nothing_as_stale() -> None:
    """Staleness is a live-load policy: a source 2 s behind another is fused in replay."""
    route = {"modality": "text", "processor": "passthrough", "intake": "real_time", "max_staleness_ms": 1000}
    messages = []
    for i in range(5):
        messages.append(("r.in.a.text", T + i * 20 * MS, f"a{i}"))
        messages.append(("r.in.b.text", T - 2000 * MS + i * 20 * MS, f"b{i}"))
    lines = replayed([route], messages)
    assert fused_of(lines) == sorted(e for _, _, e in messages)
    assert not any(rec.get("skipped") for rec in lines)


def test_a_refused_message_does_not_move_replays_clock() -> None:
    """A malformed message's (future) timestamp must not close the open windows."""
    route = {"modality": "text", "processor": "passthrough"}
    lines = replayed(
        [route],
        [
            ("r.in.cam.text", T, "e0"),
            ("r.in.cam.bogus", T + 3600 * 10**9, "bad"),
            ("r.in.cam.text", T + 20 * MS, "e1"),
        ],
    )
    assert [rec["rejected"]["reason"] for rec in lines if "rejected" in rec] == ["bad_subject"]
    assert [rec["events"] for rec in lines if "events" in rec] == [{"text": ["e0", "e1"]}]


def test_a_window_of_rate_limited_events_only_is_written_as_its_window_part() -> None:
    """Replay writes what the engine publishes before the GLM adds its part,
    also for a window whose events were all skipped (no prompt, no latencies)."""
    cfg = parse_config(
        {
            "nats": {"subject_prefix": "r"},
            "routes": [{"modality": "text", "processor": "passthrough"}],
            "aligner": {"window_ms": 50, "allowed_lateness_ms": 0, "idle_timeout_ms": 300},
        },
        env={},
    )
    routes = build_routes(cfg)
    routes[0].limiter = RateLimiter(5)  # one event in 200 ms
    out = io.BytesIO()
    r = Replayer(cfg, out, routes=routes)
    for i in range(8):
        r.feed(
            "r.in.cam.text", encode_headers(T + i * 60 * MS, "text/plain", event_id=f"e{i}"), b"x", f"js{i}"
        )
    r.finish()
    r.close()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    skipped_only = [rec for rec in lines if not rec["events"]]
    assert skipped_only and all(rec["skipped"]["rate_limited"] for rec in skipped_only)
    window_part = {
        "result_id", "source", "window", "events", "missing", "features", "models", "trace_id", "skipped"
    }  # fmt: skip
    assert all(set(rec) == window_part for rec in skipped_only)
    assert not any({"prompt", "answer", "glm", "latency_ms"} & set(rec) for rec in lines)
