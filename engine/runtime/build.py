"""Config -> live objects: the one module that turns ``routing.toml``'s models
into routes, batchers, the aligner, the GLM stage and tracing.

``engine.config`` is data only and imports no live class; the live classes
take their config models. Wiring both together here, above both, is what
keeps the arrows between them pointing one way. Processors are found by
name in :mod:`engine.contracts.plugins`, so nothing here imports
``processors`` either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.align.aligner import Aligner
from engine.align.nearest import NearestAligner
from engine.config.models import (
    AlignerConfig,
    BatchConfig,
    EngineConfig,
    GLMConfig,
    RouteConfig,
    TracingConfig,
)
from engine.contracts.plugins import lookup
from engine.contracts.types import Clock
from engine.glm.memory import Memory
from engine.glm.stage import GLMStage, Publish
from engine.glm.trigger import ChangeTrigger
from engine.observe.tracing import Tracing
from engine.pipeline.batcher import Batcher
from engine.pipeline.ensemble import Ensemble
from engine.pipeline.router import Route
from engine.runtime.memorykv import KVStateStore
from engine.transport.streams import replicas_for

__all__ = [
    "build_aligner",
    "build_batcher",
    "build_glm_stage",
    "build_memory",
    "build_route",
    "build_routes",
    "build_tracing",
    "build_trigger",
]


def build_batcher(cfg: BatchConfig) -> Batcher[Any]:
    return Batcher(
        max_batch_size=cfg.max_batch_size,
        max_wait_ns=int(cfg.max_wait_ms * 1_000_000),
        max_queue=cfg.max_queue,
        overload=cfg.overload,
    )


def build_route(rc: RouteConfig, name: str) -> Route:
    """The route's processor (loaded by name from the registry) and its batcher;
    with ``also`` processors, all of them as one :class:`Ensemble`."""
    processor = lookup(rc.processor).create(rc.params, rc.modality, rc.device, rc.dtype)
    if rc.also:
        members = [processor] + [
            lookup(a.processor).create(a.params, rc.modality, rc.device, rc.dtype) for a in rc.also
        ]
        processor = Ensemble(members, [rc.processor, *(a.processor for a in rc.also)])
    return Route(name=name, config=rc, processor=processor, batcher=build_batcher(rc.batch))


def build_routes(config: EngineConfig) -> list[Route]:
    """Every route of ``config``, named by its place in the file (as config errors name it)."""
    return [build_route(rc, f"routes[{i}]") for i, rc in enumerate(config.routes)]


def build_aligner(cfg: AlignerConfig, clock: Clock) -> Aligner | NearestAligner:
    return NearestAligner(cfg, clock) if cfg.mode == "nearest" else Aligner(cfg, clock)


def build_glm_stage(cfg: GLMConfig, publish: Publish) -> GLMStage:
    return GLMStage(cfg, publish)


def build_trigger(cfg: GLMConfig) -> ChangeTrigger | None:
    """The pipeline's GLM trigger: ``on_change`` remembers each source's last sent frame."""
    if cfg.trigger != "on_change":
        return None
    return ChangeTrigger(cfg.change_threshold, cfg.max_interval_ms * 1_000_000)


async def build_memory(
    nc: Any, config: EngineConfig, trigger: Callable[[], ChangeTrigger | None], stage: Callable[[], GLMStage]
) -> Memory:
    """Durable mode: the GLM state of each source in ``<STREAM>_GLM``, shared by the workers."""
    nats = config.nats
    store = await KVStateStore.open(nc.jetstream(), nats, await replicas_for(nc, nats))
    return Memory(
        store,
        trigger=trigger,
        stage=stage,
        max_pending=nats.glm_state_pending,
        timeout_s=nats.glm_state_timeout_s,
    )


def build_tracing(cfg: TracingConfig) -> Tracing:
    return Tracing(cfg)
