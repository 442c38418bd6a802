"""``autoglm models`` and ``autoglm ab report``: what is loaded, and how each A/B variant did.

``models`` asks every engine on the server (``$SRV.STATS``) for the models
its routes hold: variant, role, processor, model, version, device, dtype,
load time and events.

``ab report`` reads the results stream (``<STREAM>_OUT``, durable mode) from
``--since`` and groups each result's modalities by the variant its
``models.<modality>`` names: sources, events, processing latency p50/p99 and
GLM calls made and skipped, per route (modality) and variant. Shadow variants
publish no results; their distance to the live features comes from the live
engines' counters (the same ``$SRV.STATS``): the mean cosine distance over
the events they compared.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from engine.config.models import EngineConfig
from engine.contracts.subjects import Subjects
from engine.transport.streams import stream_names


def _data(reply: dict[str, Any]) -> dict[str, Any]:
    """The STATS payload of one ``$SRV.STATS`` reply (the engine has one endpoint's worth)."""
    data: dict[str, Any] = (reply.get("endpoints") or [{}])[0].get("data") or {}
    return data


def _prefix(reply: dict[str, Any]) -> str:
    return str((reply.get("metadata") or {}).get("subject_prefix", "?"))


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def models_table(replies: Iterable[dict[str, Any]]) -> str:
    """One line per loaded model of every engine that answered."""
    rows = [("engine", "route", "variant", "role", "processor", "model", "version", "device", "dtype",
             "load_s", "events")]  # fmt: skip
    for reply in replies:
        for m in _data(reply).get("models") or []:
            rows.append((
                f"{_prefix(reply)}/{str(reply.get('id', '?'))[:8]}", m["route"], m["variant"] or "-",
                m["role"], m["processor"], m["model"], m["version"] or "-", m["device"] or "-",
                m["dtype"] or "-", f"{m['load_s']:.2f}", str(m["events"]),
            ))  # fmt: skip
    return _table(rows) if len(rows) > 1 else "no engine answered"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


@dataclass
class Arm:
    """What one (modality, variant) saw in the results."""

    model: dict[str, str]
    sources: set[str] = field(default_factory=set)
    events: int = 0
    results: int = 0
    process_ms: list[float] = field(default_factory=list)
    glm_made: int = 0
    glm_skipped: int = 0


@dataclass
class Report:
    arms: dict[tuple[str, str], Arm] = field(default_factory=dict)
    results: int = 0

    def add(self, result: dict[str, Any]) -> None:
        """One result: each of its modalities counts for the variant that made it."""
        self.results += 1
        glm = result.get("glm") or {}
        made = "latency_ms" in glm
        for modality, ids in (result.get("events") or {}).items():
            model = (result.get("models") or {}).get(modality) or {}
            key = (modality, model.get("variant", ""))
            arm = self.arms.setdefault(key, Arm(model))
            arm.sources.add(result["source"])
            arm.events += len(ids)
            arm.results += 1
            arm.process_ms.append(float((result.get("latency_ms") or {}).get("process", 0.0)))
            arm.glm_made += made
            arm.glm_skipped += "skipped" in glm

    def text(self, shadows: Sequence[dict[str, Any]] = ()) -> str:
        rows = [("route", "variant", "processor", "model", "version", "sources", "events", "p50_ms",
                 "p99_ms", "glm_calls", "glm_skipped")]  # fmt: skip
        for (modality, variant), a in sorted(self.arms.items()):
            rows.append((
                modality, variant or "-", a.model.get("processor", "?"), a.model.get("model", "?"),
                a.model.get("version", "?") or "-", str(len(a.sources)), str(a.events),
                f"{_quantile(a.process_ms, 0.5):.1f}", f"{_quantile(a.process_ms, 0.99):.1f}",
                str(a.glm_made), str(a.glm_skipped),
            ))  # fmt: skip
        lines = [_table(rows), f"({self.results} results)"]
        for s in shadows:
            mean = s["distance"] / s["compared"] if s["compared"] else float("nan")
            lines.append(
                f"shadow {s['route']} {s['variant']} ({s['processor']}/{s['model']} {s['version']}): "
                f"{s['events']} events, {s['errors']} errors, mean cosine distance to live {mean:.4f} "
                f"over {s['compared']} compared"
            )
        return "\n".join(lines)


def shadows_of(replies: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for r in replies for m in _data(r).get("models") or [] if m.get("role") == "shadow"]


async def results_since(
    nc: Any, config: EngineConfig, since: datetime | None
) -> AsyncIterator[dict[str, Any]]:
    """Every result in the results stream from ``since`` to its end at the time of the call."""
    from engine.tools.replay import stored_until_now

    stream = stream_names(config.nats)[1]
    missing = f"no results stream {stream} on this server (durable mode keeps one)"
    async for msg in stored_until_now(
        nc, stream, Subjects(config.nats.subject_prefix).result("*"), since, missing
    ):
        yield orjson.loads(msg.data)
