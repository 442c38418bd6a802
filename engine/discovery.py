"""The engine as a NATS micro service, so standard NATS tooling finds it.

``$SRV.PING.autoglm``, ``$SRV.INFO.autoglm`` and ``$SRV.STATS.autoglm`` answer
for every running engine (the stats carry the engine's counters), and two
endpoints answer requests: ``<prefix>.svc.health`` and ``<prefix>.svc.config``
(the running configuration as JSON; it holds the *name* of the API-key
variable, never a key).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
from nats.micro import add_service
from nats.micro.request import Request

if TYPE_CHECKING:
    from engine.app import Engine

SERVICE_NAME = "autoglm"


def summary(engine: Engine) -> dict[str, Any]:
    """What ``$SRV.STATS`` and ``autoglm status`` show for one engine."""
    s, g = engine.stats, engine.glm
    return {
        **s.as_dict(),
        "batches": {
            f"{r.config.modality}:{r.config.processor}": {
                "batches": sum(r.batcher.stats.sizes.values()),
                "mean_size": round(r.batcher.stats.mean_batch, 2),
                "queue": len(r.batcher),
            }
            for r in engine.routes
        },
        "glm": {
            "backend": g.config.backend,
            "calls": g.stats.calls,
            "errors": g.stats.errors,
            "skipped": dict(g.stats.skipped or {}),
            "breaker": g.breaker.state,
            "queued": g.queued,
        },
        "durable": engine.intake is not None,
        "unacked": len(engine.intake.held) if engine.intake is not None else 0,
    }


async def register(engine: Engine, nc: Any) -> Any:
    from engine import __version__

    started = time.monotonic()
    prefix = engine.prefix

    async def health(req: Request) -> None:
        await req.respond(
            orjson.dumps(
                {
                    "status": "ok",
                    "uptime_s": round(time.monotonic() - started, 1),
                    "durable": engine.intake is not None,
                    "open_windows": engine.aligner.open_windows,
                }
            )
        )

    async def config(req: Request) -> None:
        await req.respond(engine.config.model_dump_json().encode())

    service = await add_service(
        nc,
        name=SERVICE_NAME,
        version=__version__,
        description="Open-AutoGLM multimodal ingestion engine",
        metadata={"subject_prefix": prefix},
        stats_handler=lambda endpoint: summary(engine),
    )
    await service.add_endpoint(name="health", subject=f"{prefix}.svc.health", handler=health)
    await service.add_endpoint(name="config", subject=f"{prefix}.svc.config", handler=config)
    return service
