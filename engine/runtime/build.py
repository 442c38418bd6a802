"""Config -> live objects: the one module that turns ``routing.toml``'s models
into routes, batchers, the aligner, the GLM stage and tracing.

``engine.config`` is data only and imports no live class; the live classes
take their config models. Wiring both together here, above both, is what
keeps the arrows between them pointing one way. Processors are found by
name in :mod:`engine.contracts.plugins`, so nothing here imports
``processors`` either.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
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
    VariantConfig,
)
from engine.contracts.plugins import lookup
from engine.contracts.types import Clock
from engine.contracts.versions import identify
from engine.glm.memory import Memory
from engine.glm.stage import GLMStage, Publish
from engine.glm.trigger import ChangeTrigger
from engine.observe.tracing import Tracing
from engine.pipeline.batcher import Batcher
from engine.pipeline.ensemble import Ensemble
from engine.pipeline.router import Route
from engine.pipeline.variants import Variant
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
    "build_variant",
]


def build_batcher(cfg: BatchConfig) -> Batcher[Any]:
    return Batcher(
        max_batch_size=cfg.max_batch_size,
        max_wait_ns=int(cfg.max_wait_ms * 1_000_000),
        max_queue=cfg.max_queue,
        overload=cfg.overload,
    )


def build_route(rc: RouteConfig, name: str, loaded: Sequence[Variant] = ()) -> Route:
    """The route's processors (loaded by name from the registry, one per A/B
    variant), each versioned once here, and its batcher. A model in ``loaded``
    (the same route's, on a reload) with the same processor, params, device,
    dtype and weight files' bytes is reused, not loaded again: new weights or
    a new variant beside it cost no reload of the others. Each loaded model is
    reused at most once, so two variants never share one instance."""
    vcs: Sequence[VariantConfig | None] = rc.variants or [None]
    variants: list[Variant] = []
    for vc in vcs:
        taken = {id(v.processor) for v in variants}
        variants.append(build_variant(rc, vc, [v for v in loaded if id(v.processor) not in taken]))
    first = next(v for v in variants if not v.shadow and v.weight > 0)
    return Route(
        name=name, config=rc, processor=first.processor, batcher=build_batcher(rc.batch), variants=variants
    )


def build_variant(rc: RouteConfig, vc: VariantConfig | None, loaded: Sequence[Variant] = ()) -> Variant:
    """One processor of a route: the route's own, or a variant's (its processor,
    params on top of the route's, dtype), with its :class:`ModelVersion`; the
    route's ``also`` processors run beside it (an :class:`Ensemble`)."""
    processor_name = (vc.processor if vc is not None else "") or rc.processor
    dtype = (vc.dtype if vc is not None else "") or rc.dtype
    params = {**rc.params, **(vc.params if vc is not None else {})}
    spec = lookup(processor_name)
    validated = spec.params.model_validate(params).model_dump(mode="json")
    also = [a.model_dump(mode="json") for a in rc.also]
    key = json.dumps(
        [processor_name, validated, rc.modality, rc.device, dtype, also], sort_keys=True, default=str
    )
    name = vc.name if vc is not None else ""
    weight, shadow = (vc.weight, vc.shadow) if vc is not None else (1.0, False)
    same = next((v for v in loaded if v.key == key and not v.weights_changed()), None)
    if same is not None:
        model = replace(same.model, variant=name)
        return Variant(
            name, weight, same.processor, model, shadow, same.device, same.dtype, same.load_s, key=key
        )
    t0 = time.perf_counter()
    processor = spec.create(params, rc.modality, rc.device, dtype)
    if rc.also:  # words beside the features: one Ensemble processor, versioned by its first member
        members = [processor] + [
            lookup(a.processor).create(a.params, rc.modality, rc.device, dtype) for a in rc.also
        ]
        processor = Ensemble(members, [processor_name, *(a.processor for a in rc.also)])
    load_s = time.perf_counter() - t0
    model = identify(processor_name, processor, validated, name)
    device = str(getattr(processor, "device", rc.device))
    dtype_loaded = str(getattr(processor, "dtype", dtype)).removeprefix("torch.")
    return Variant(name, weight, processor, model, shadow, device, dtype_loaded, load_s, key=key)


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
