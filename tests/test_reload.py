"""Hot reload: routes, batching and GLM swapped live, nothing dropped; bad files refused."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from engine.config.models import RouteConfig, load_config, with_overrides
from engine.contracts.plugins import ProcessorSpec
from engine.contracts.types import Features, InputEvent, Modality
from engine.runtime.build import build_route
from engine.runtime.engine import Engine
from engine.wire.codec import encode_headers
from processors.params import PassthroughParams
from tests.conftest import ROOT, collect, eventually, round_trip, send, spawn_engine, srv_stats, stored

MS = 1_000_000


def routing(prefix: str, *, text_batch: int = 4, template: str = "v1 {source}", window_ms: int = 50) -> str:
    return (
        f'[nats]\nsubject_prefix = "{prefix}"\ndurable = false\n'
        f"[aligner]\nwindow_ms = {window_ms}\nidle_timeout_ms = 200\n"
        f'[glm]\ntemplate = "{template}"\n'
        '[[routes]]\nmodality = "image"\nprocessor = "passthrough"\n'
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
        f"[routes.batch]\nmax_batch_size = {text_batch}\n"
    )


async def started(cfg: Path, url: str) -> Engine:
    """An engine running from the routing file ``cfg`` (so it can reload it)."""
    engine = Engine(load_config(cfg, env={}), config_path=cfg)
    await engine.start(url)
    return engine


async def stream(nc: Any, prefix: str, n: int, sent: set[str], pause: float = 0.002) -> None:
    """Publish n text+image pairs from two sources with advancing event time
    (paced, so that a reload lands while events still arrive)."""
    base = time.time_ns()
    for i in range(n):
        for s in ("a", "b"):
            for mod in ("text", "image"):
                eid = f"{s}-{mod}-{i}"
                sent.add(eid)
                await send(nc, prefix, s, mod, b"x" * 10, base + i * 5 * MS, event_id=eid)
        await asyncio.sleep(pause)


async def test_reload_under_load_swaps_routes_and_glm_and_loses_nothing(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "routing.toml"
    cfg.write_text(routing(prefix))
    out = await collect(nc, f"{prefix}.out.>")
    engine = await started(cfg, nats_url)
    image_route, text_route = engine.routes
    sent: set[str] = set()
    producer = asyncio.create_task(stream(nc, prefix, 400, sent))
    await out.wait_for(1)  # mid-stream: the old config has published
    cfg.write_text(routing(prefix, text_batch=16, template="v2 {source}"))
    report = await engine.reload()
    assert report["ok"] and report["applied"] == ["routes", "glm"], report
    assert report["routes"] == {"kept": 1, "new": 1, "retired": 1}
    await producer
    await nc.flush()
    await out.wait_events(sent)
    stats = await srv_stats(nc, prefix)
    await engine.stop()
    await round_trip(nc)  # whatever the stop published has reached us: no second copy hides
    results = [body for _, _, body in out.items]
    fused = [e for r in results for group in r["events"].values() for e in group]
    assert len(fused) == len(set(fused)) and set(fused) == sent  # every event once, none dropped
    assert engine.routes[0] is image_route and engine.routes[1] is not text_route  # unchanged route kept
    assert engine.routes[1].batcher.max_batch_size == 16
    prompts = [r["prompt"].split()[0] for r in results]
    assert prompts[0] == "v1" and prompts[-1] == "v2"  # the new GLM template took over
    assert stats["reloads"] == 1 and engine.config.glm.template == "v2 {source}"


async def test_invalid_file_is_refused_with_its_errors_and_the_running_config_stays(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "routing.toml"
    cfg.write_text(routing(prefix))
    out = await collect(nc, f"{prefix}.out.>")
    engine = await started(cfg, nats_url)
    before, routes = engine.config, list(engine.routes)
    cfg.write_text(routing(prefix).replace("max_batch_size = 4", "max_batch_size = 4\nmax_wait_ms = -5"))
    report = await engine.reload()
    assert not report["ok"]
    assert report["errors"] == ["routes[1].batch.max_wait_ms = -5: must be >= 0"]
    # a model that cannot be built refuses the reload too
    cfg.write_text(
        routing(prefix).replace(
            '"passthrough"\n[routes.batch]', '"minilm"\nparams = {model = "/nope"}\n[routes.batch]'
        )
    )
    report = await engine.reload()
    assert not report["ok"] and "/nope" in report["errors"][0], report
    assert engine.config is before and engine.routes == routes
    assert (await srv_stats(nc, prefix))["reloads_failed"] == 2
    sent: set[str] = set()
    await stream(nc, prefix, 10, sent)  # still running on the old config
    await nc.flush()
    await out.wait_events(sent)
    await engine.stop()
    await round_trip(nc)
    fused = [e for _, _, r in out.items for group in r["events"].values() for e in group]
    assert sorted(fused) == sorted(sent)


async def test_sections_that_need_a_restart_are_reported_and_kept(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "routing.toml"
    cfg.write_text(routing(prefix))
    engine = await started(cfg, nats_url)
    cfg.write_text(routing(prefix, window_ms=500))
    report = await engine.reload()
    await engine.stop()
    assert report["ok"] and report["applied"] == [] and report["restart_required"] == ["aligner"]
    assert engine.config.aligner.window_ms == 50


async def test_command_line_overrides_survive_a_reload(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "routing.toml"
    cfg.write_text(routing(prefix))
    overrides = {"metrics": {"port": 0}}  # `--metrics-port 0`
    engine = Engine(with_overrides(load_config(cfg, env={}), overrides), config_path=cfg, overrides=overrides)
    await engine.start(nats_url)
    report = await engine.reload()  # the file has no [metrics]: not a change
    await engine.stop()
    assert report["ok"] and report["applied"] == [] and report["restart_required"] == []
    assert engine.config.metrics.port == 0


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.tools.cli", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_sighup_and_autoglm_reload_reach_a_running_engine(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "routing.toml"
    cfg.write_text(routing(prefix))
    engine = await spawn_engine("--config", str(cfg), "--nats-url", nats_url)
    assert engine.stdout is not None
    await engine.stdout.readline()  # "Ctrl-C ... SIGHUP reloads"
    cfg.write_text(routing(prefix, text_batch=32))
    engine.send_signal(signal.SIGHUP)
    line = await asyncio.wait_for(engine.stdout.readline(), 30)
    assert b"autoglm: reload applied: routes" in line, line
    reply = await nc.request(f"{prefix}.svc.config", b"", timeout=5)
    assert b'"max_batch_size":32' in reply.data

    cfg.write_text(routing(prefix, text_batch=32, template="v3 {source}"))
    code, out, err = await run_cli("reload", "--nats-url", nats_url, "--prefix", prefix)
    assert code == 0 and out.endswith(f"({prefix}): applied: glm\n"), out + err
    cfg.write_text(routing(prefix).replace('template = "v1 {source}"', 'template = "{nope}"'))
    code, out, err = await run_cli("reload", "--nats-url", nats_url, "--prefix", prefix)
    assert code == 2 and "refused" in out and "glm.template" in out, out + err

    engine.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(engine.wait(), 30) == 0


class Slow:
    """A processor that takes 20 ms a batch, so a small queue fills."""

    def __init__(self, modality: Modality) -> None:
        self.modality = modality

    def prepare(self, event: InputEvent) -> int:
        return len(event.payload)

    def run(self, items: Sequence[int]) -> list[Features]:
        time.sleep(0.02)  # the model's work
        return [Features(self.modality, stats={"bytes": float(n)}) for n in items]


def make_slow(params: PassthroughParams, modality: Modality, device: str, dtype: str) -> Slow:
    return Slow(modality)


def parked_routing(prefix: str, queue: int) -> str:
    return (
        f'[nats]\nsubject_prefix = "{prefix}"\ndurable = true\nfetch_batch = 64\n'
        "[aligner]\nwindow_ms = 50\nidle_timeout_ms = 2000\n"
        '[[routes]]\nmodality = "image"\nprocessor = "test-reload-slow"\nintake = "complete"\n'
        f"[routes.batch]\nmax_batch_size = 1\nmax_wait_ms = 0\nmax_queue = {queue}\n"
    )


async def test_a_reload_while_intake_waits_for_room_loses_nothing(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path, use_processor: Any
) -> None:
    """The full route is replaced while an event is parked for room in it: the
    old route finishes its queue, intake resumes into the new one, every event
    is stored once, and the idle clock is not left paused."""
    use_processor(ProcessorSpec("test-reload-slow", None, PassthroughParams, "tests.test_reload:make_slow"))
    cfg = tmp_path / "r.toml"
    cfg.write_text(parked_routing(prefix, 2))
    engine = Engine(load_config(cfg, env={}), config_path=cfg)
    await engine.start(nats_url)
    dlq = await collect(nc, f"{prefix}.dlq.>")
    js = nc.jetstream()
    base = time.time_ns()
    sent = {f"e{i}" for i in range(80)}
    for i in range(80):
        headers = encode_headers(base + i * 5 * MS, "image/jpeg", event_id=f"e{i}")
        await js.publish(f"{prefix}.in.cam.image", b"x", headers=headers)
    await eventually(_now(lambda: engine.pipeline.paused), "intake waiting for room")
    cfg.write_text(parked_routing(prefix, 3))
    report = await engine.reload()
    assert report["ok"] and report["routes"] == {"kept": 0, "new": 1, "retired": 1}, report

    async def all_stored() -> bool:
        records = [r for _, r in await stored(nc, f"{prefix}.out.>")]
        got = [
            e for r in records for g in (*r["events"].values(), *(r.get("skipped") or {}).values()) for e in g
        ]
        return sorted(got) == sorted(sent)

    await eventually(all_stored, "every event stored once", 60)
    await engine.idle()
    snap = engine.snapshot()
    assert not engine.pipeline.paused and snap.transport.unacked == 0
    assert snap.health["status"] == "ok", snap.health  # intake_waiting recovered
    await engine.stop()
    assert not dlq.items


def _now(check: Any) -> Any:
    async def poll() -> Any:
        return check()

    return poll


# -- which loaded models a reload reuses -------------------------------------------------------


class WeightedParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str


class Weighted:
    """A model whose features say which weights it loaded: ``w`` = their first byte."""

    def __init__(self, params: WeightedParams, modality: Modality) -> None:
        self.modality, self.weight_files = modality, [params.path]
        self.first = float(Path(params.path).read_bytes()[0])

    def prepare(self, event: InputEvent) -> bytes:
        return event.payload

    def run(self, items: Sequence[bytes]) -> list[Features]:
        return [Features(self.modality, stats={"w": self.first}) for _ in items]


def make_weighted(params: WeightedParams, modality: Modality, device: str, dtype: str) -> Weighted:
    return Weighted(params, modality)


WEIGHTED = ProcessorSpec("test-weighted", None, WeightedParams, "tests.test_reload:make_weighted")


def _event(source: str = "cam") -> InputEvent:
    return InputEvent(f"p.in.{source}.text", source, "text", 1, None, b"x", "e1")  # type: ignore[arg-type]


def test_a_rebuilt_route_loads_new_weights_dropped_at_the_same_path(
    use_processor: Any, tmp_path: Path
) -> None:
    use_processor(WEIGHTED)
    w = tmp_path / "model.bin"
    w.write_bytes(b"\x01" * 100)
    rc = RouteConfig.model_validate(
        {"modality": "text", "processor": "test-weighted", "params": {"path": str(w)}}
    )
    old = build_route(rc, "r")
    same = build_route(rc, "r", loaded=old.variants)
    assert same.variants[0].processor is old.variants[0].processor  # unchanged bytes: reused
    w.write_bytes(b"\x02" * 100)  # a training job drops new weights in place
    os.utime(w, ns=(1, 1))  # (whatever the mtime: the bytes decide)
    new = build_route(rc, "r", loaded=old.variants)
    assert new.variants[0].processor is not old.variants[0].processor
    assert new.variants[0].model.version != old.variants[0].model.version
    [f] = new.process([_event()])
    assert isinstance(f, Features) and f.stats["w"] == 2.0


def weighted_routing(prefix: str, path: Path, batch: int) -> str:
    route = f'modality = "text"\nprocessor = "test-weighted"\nparams = {{ path = "{path}" }}\n'
    return (
        f'[nats]\nsubject_prefix = "{prefix}"\ndurable = false\n'
        f'[[routes]]\nsubject = "{prefix}.in.a.text"\n{route}'
        f'[[routes]]\nsubject = "{prefix}.in.b.text"\n{route}[routes.batch]\nmax_batch_size = {batch}\n'
    )


async def test_a_reload_reuses_a_model_only_in_its_own_route_and_reloads_new_weights(
    nats_url: str, prefix: str, tmp_path: Path, use_processor: Any
) -> None:
    use_processor(WEIGHTED)
    w = tmp_path / "model.bin"
    w.write_bytes(b"\x01" * 100)
    cfg = tmp_path / "r.toml"
    cfg.write_text(weighted_routing(prefix, w, 4))
    engine = await started(cfg, nats_url)
    try:
        a, b = (r.variants[0].processor for r in engine.pipeline.routes)
        cfg.write_text(weighted_routing(prefix, w, 8))  # route b changes, its model does not
        report = await engine.reload()
        assert report["ok"] and report["routes"] == {"kept": 1, "new": 1, "retired": 1}, report
        a2, b2 = (r.variants[0].processor for r in engine.pipeline.routes)
        assert a2 is a and b2 is b  # b's own model, not a's: two routes never share one
        w.write_bytes(b"\x02" * 100)  # same file, same routing.toml: only the bytes are new
        os.utime(w, ns=(1, 1))
        report = await engine.reload()
        assert report["ok"] and report["routes"]["kept"] == 0, report
        for route in engine.pipeline.routes:
            [f] = route.process([_event()])
            assert isinstance(f, Features) and f.stats["w"] == 2.0
    finally:
        await engine.stop()
