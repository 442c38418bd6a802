"""Hot reload: re-read ``routing.toml`` and swap routes, batching, limits and GLM live.

Triggered by SIGHUP (``autoglm run``) or ``autoglm reload`` (the engine's
``<prefix>.svc.reload.<id>`` endpoint). The order keeps every event:

1. Parse and validate the file. Any problem -> refused, with every error;
   the running config stays.
2. Build what changed, off the event loop (a model load can take seconds):
   routes whose config is unchanged are kept as they are, queue and model
   included; a new GLM stage if ``[glm]`` changed. A build failure (a model
   path that does not exist) also refuses the reload and frees what was built.
3. Swap in one step on the loop: the router sends new events to the new
   routes; the replaced routes finish their queued batches in the background,
   and their events reach the same aligner. The old GLM stage finishes its
   queued calls and publishes them; history and counters carry over.

``[nats]``, ``[aligner]``, ``[metrics]`` and ``[tracing]`` hold connections,
open windows and listeners: a change there is reported as needing a restart
and the running values stay, so ``<prefix>.svc.config`` always shows what runs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from engine.config.models import EngineConfig, load_config, updated, with_overrides
from engine.contracts.errors import ConfigError
from engine.pipeline.router import Route, Router
from engine.runtime.build import build_glm_stage, build_route
from engine.wire.codec import Limits

if TYPE_CHECKING:
    from engine.runtime.engine import Engine

log = logging.getLogger("autoglm.reload")

LIVE = ("routes", "limits", "glm")
RESTART = ("nats", "aligner", "metrics", "tracing")


def plan(old: EngineConfig, new: EngineConfig) -> tuple[list[str], list[str]]:
    """Sections that change live, and sections whose change needs a restart."""
    live = [k for k in LIVE if getattr(old, k) != getattr(new, k)]
    restart = [k for k in RESTART if getattr(old, k) != getattr(new, k)]
    return live, restart


def refused(errors: list[str]) -> dict[str, Any]:
    return {"ok": False, "errors": errors, "applied": [], "restart_required": []}


async def reload_from_file(engine: Engine) -> dict[str, Any]:
    if engine.config_path is None:
        return refused(["this engine was not started from a routing file"])
    try:
        new = with_overrides(await asyncio.to_thread(load_config, engine.config_path), engine.overrides)
    except ConfigError as exc:
        engine.stats.reloads_failed += 1
        log.error("reload of %s refused: %s", engine.config_path, "; ".join(exc.problems))
        return refused(list(exc.problems))
    return await apply(engine, new)


async def apply(engine: Engine, new: EngineConfig) -> dict[str, Any]:
    """Swap what changed from ``engine.config`` to ``new`` (already validated)."""
    async with engine.reload_lock:
        old = engine.config
        live, restart = plan(old, new)
        kept: list[Route] = []
        reusable = list(zip(old.routes, engine.routes, strict=True))
        plan_routes: list[Route | int] = []
        for i, rc in enumerate(new.routes):
            match = next((r for c, r in reusable if c == rc and all(r is not k for k in kept)), None)
            if match is not None:
                kept.append(match)
                plan_routes.append(match)
            else:
                plan_routes.append(i)
        built: dict[int, Route] = {}
        try:
            built = await asyncio.to_thread(_build, new, plan_routes)
            stage = (
                await asyncio.to_thread(build_glm_stage, new.glm, engine.send_result)
                if "glm" in live
                else None
            )
        except Exception as exc:  # processor/model construction: refuse, keep running
            for route in built.values():
                await asyncio.to_thread(route.close)
            engine.stats.reloads_failed += 1
            log.error("reload refused: %s", exc)
            return refused([f"{type(exc).__name__}: {exc}"])
        routes = [p if isinstance(p, Route) else built[p] for p in plan_routes]
        retired = [r for r in engine.routes if all(r is not k for k in kept)]
        for route in built.values():
            engine.launch_route(route)
        engine.routes = routes
        engine.router = Router(routes)
        engine.limits = Limits(max_payload_bytes=new.limits.max_payload_bytes)
        if engine.claims is not None:
            engine.claims.max_bytes = new.limits.max_payload_bytes
        for route in retired:
            engine.in_background(engine.retire_route(route))
        if stage is not None:
            old_stage, engine.glm = engine.glm, stage
            stage.adopt(old_stage)
            stage.start()
            for task in stage.tasks:
                engine.supervisor.watch("glm-worker", task)
            for task in old_stage.tasks:
                engine.supervisor.release(task)
            engine.in_background(old_stage.drain(old.glm.call_timeout_s))
        engine.config = updated(new, {k: getattr(old, k) for k in restart})
        engine.stats.reloads += 1
        report = {
            "ok": True,
            "errors": [],
            "applied": live,
            "restart_required": restart,
            "routes": {"kept": len(kept), "new": len(built), "retired": len(retired)},
        }
        log.warning("reloaded %s: %s", engine.config_path or "config", report)
        return report


def _build(cfg: EngineConfig, plan_routes: list[Route | int]) -> dict[int, Route]:
    built: dict[int, Route] = {}
    try:
        for p in plan_routes:
            if isinstance(p, int):
                built[p] = build_route(cfg.routes[p], f"routes[{p}]")
    except Exception:
        for route in built.values():
            route.close()
        raise
    return built
