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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.models import EngineConfig, Overrides, load_config, updated, with_overrides
from engine.contracts.plugins import discover
from engine.glm.stage import GLMStage
from engine.pipeline.router import Route

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


@dataclass
class Change:
    """A validated, built reload, ready to swap in (see :meth:`Engine.swap`)."""

    #: What will run: the new file, with the sections that need a restart kept.
    config: EngineConfig
    #: The routes in the new order: unchanged ones kept (queue and model), new ones built.
    routes: list[Route]
    built: list[Route]
    retired: list[Route]
    #: A new GLM stage when ``[glm]`` changed.
    stage: GLMStage | None
    report: dict[str, Any]


async def read(path: str | Path, overrides: Overrides) -> EngineConfig:
    """Parse and validate the file (raises :class:`ConfigError` with every problem),
    the processor plugins discovered again first: one installed since the last
    look can be routed to, and one that broke refuses the reload if it is used."""
    await asyncio.to_thread(discover)
    return with_overrides(await asyncio.to_thread(load_config, path), overrides)


async def prepare(
    old: EngineConfig,
    running: Sequence[Route],
    new: EngineConfig,
    build_route: Callable[[EngineConfig, int], Route],
    build_stage: Callable[[EngineConfig], GLMStage],
) -> Change:
    """Build what changed, off the event loop (a model load can take seconds).
    A build failure refuses the reload (raised) and frees what was built."""
    live, restart = plan(old, new)
    kept: list[Route] = []
    # A route whose config is unchanged is kept, unless new weights were dropped
    # in place at its weight files' paths (hashed off the event loop).
    fresh = await asyncio.to_thread(
        lambda: [r for r in running if not any(v.weights_changed() for v in r.variants)]
    )
    reusable = [(c, r) for c, r in zip(old.routes, running, strict=True) if any(r is f for f in fresh)]
    slots: list[Route | int] = []
    for i, rc in enumerate(new.routes):
        match = next((r for c, r in reusable if c == rc and all(r is not k for k in kept)), None)
        if match is not None:
            kept.append(match)
            slots.append(match)
        else:
            slots.append(i)
    built: dict[int, Route] = {}
    try:
        for slot in slots:
            if isinstance(slot, int):
                built[slot] = await asyncio.to_thread(build_route, new, slot)
        stage = await asyncio.to_thread(build_stage, new) if "glm" in live else None
    except Exception:
        for route in built.values():
            await asyncio.to_thread(route.close)
        raise
    routes = [s if isinstance(s, Route) else built[s] for s in slots]
    retired = [r for r in running if all(r is not k for k in kept)]
    report = {
        "ok": True,
        "errors": [],
        "applied": live,
        "restart_required": restart,
        "routes": {"kept": len(kept), "new": len(built), "retired": len(retired)},
    }
    return Change(
        updated(new, {k: getattr(old, k) for k in restart}),
        routes,
        list(built.values()),
        retired,
        stage,
        report,
    )
