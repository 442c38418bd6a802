"""The engine as a NATS micro service, so standard NATS tooling finds it.

``$SRV.PING.autoglm``, ``$SRV.INFO.autoglm`` and ``$SRV.STATS.autoglm`` answer
for every running engine (the stats carry the engine's counters), and two
endpoints answer requests: ``<prefix>.svc.health`` and ``<prefix>.svc.config``
(the running configuration as JSON; it holds the *name* of the API-key
variable, never a key), and each engine answers ``<prefix>.svc.reload.<id>``
(a hot reload of its routing file, see engine/runtime/reload.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.micro import add_service
from nats.micro.request import Request

from engine.contracts.errors import ConfigError
from engine.contracts.subjects import SERVICE_NAME, SrvVerb, Subjects, srv
from engine.observe.snapshot import Snapshot


def health_report(snap: Snapshot) -> dict[str, Any]:
    """``ok``, ``degraded`` (alive but held up: a store retrying, intake waiting
    for room) or ``unhealthy`` (a supervised task died or hung; the process is
    on its way out)."""
    return dict(snap.health)


async def register(
    nc: Any, snapshot: Callable[[], Snapshot], reload: Callable[[], Awaitable[dict[str, Any]]]
) -> Any:
    """The engine's ``$SRV`` service: stats, health, config, and its reload endpoint."""
    from engine import __version__

    started = time.monotonic()
    prefix = snapshot().prefix

    async def health(req: Request) -> None:
        snap = snapshot()
        await req.respond(
            orjson.dumps(
                {
                    **health_report(snap),
                    "uptime_s": round(time.monotonic() - started, 1),
                    "durable": snap.transport.durable,
                    "open_windows": snap.open_windows,
                }
            )
        )

    async def config(req: Request) -> None:
        await req.respond(snapshot().config_json.encode())

    service = await add_service(
        nc,
        name=SERVICE_NAME,
        version=__version__,
        description="Open-AutoGLM multimodal ingestion engine",
        metadata={"subject_prefix": prefix},
        stats_handler=lambda endpoint: snapshot().summary(),
    )
    await service.add_endpoint(name="health", subject=Subjects(prefix).service("health"), handler=health)
    await service.add_endpoint(name="config", subject=Subjects(prefix).service("config"), handler=config)

    async def on_reload(req: Request) -> None:
        await req.respond(orjson.dumps(await reload()))

    # Per instance, so `autoglm reload` reaches every engine, not one of a queue group.
    await service.add_endpoint(name="reload", subject=reload_subject(prefix, service.id), handler=on_reload)
    return service


async def refuse_a_second_engine(nc: Any, prefix: str, url: str) -> None:
    """One engine per subject prefix: a second one would split sources'
    windows between two aligners (durable: the halves share a result id and
    the results stream keeps one, losing events; core: duplicates). A request
    to the health endpoint: 'no responders' comes back at once when free."""
    try:
        msg = await nc.request(Subjects(prefix).service("health"), b"", timeout=0.5)
    except (NoRespondersError, NatsTimeoutError):
        return
    other = orjson.loads(msg.data) if msg.data.startswith(b"{") else {}
    raise ConfigError(
        [
            f"nats.subject_prefix = {prefix!r}: another engine already serves it on {url} "
            f"(up {other.get('uptime_s', '?')} s). Run one engine per prefix, or give this one "
            "its own subject_prefix."
        ]
    )


def reload_subject(prefix: str, service_id: str) -> str:
    return Subjects(prefix).reload(service_id)


async def reload_all(nc: Any, prefix: str | None = None, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Ask every engine found on this NATS (of ``prefix``, when given) to reload;
    one report per engine, with its id and prefix."""
    reports = []
    for info in await find_engines(nc, verb="INFO"):
        their = (info.get("metadata") or {}).get("subject_prefix", "")
        if prefix is not None and their != prefix:
            continue
        msg = await nc.request(reload_subject(their, info["id"]), b"", timeout=timeout)
        reports.append({"id": info["id"], "prefix": their, **orjson.loads(msg.data)})
    return reports


async def find_engines(nc: Any, wait: float = 0.5, verb: SrvVerb = "STATS") -> list[dict[str, Any]]:
    """Every engine's ``$SRV.STATS`` (or ``INFO``, ``PING``) reply on this NATS.

    A status message (``503`` no responders) is not an engine. A fresh
    connection has been seen to get a 503 for its very first request while
    two engines were listening, and no answers: asked again, they answer."""
    for _ in range(2):
        found, refused = await _ask(nc, wait, verb)
        if found or not refused:
            return sorted(found, key=lambda r: str(r.get("id")))
    return []


async def _ask(nc: Any, wait: float, verb: SrvVerb) -> tuple[list[dict[str, Any]], bool]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(srv(verb), b"", reply=inbox)
    found = []
    refused = False
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = await sub.next_msg(timeout=left)
        except Exception:  # nats TimeoutError: everyone answered
            break
        if not msg.data or (msg.headers or {}).get("Status"):
            refused = True
            continue
        try:
            reply = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            continue  # not one of ours
        if isinstance(reply, dict):
            found.append(reply)
    await sub.unsubscribe()
    return found, refused


def status_table(replies: list[dict[str, Any]]) -> str:
    """The ``autoglm status`` table: one row per engine, then (durable mode)
    its worker line; then, per prefix with workers, who owns what."""
    head = (
        f"{'engine':<24}{'prefix':<10}{'recv':>8}{'results':>9}{'rejected':>9}{'rate-lim':>9}{'unacked':>8}"
    )
    lines = [head + "  batches (mean size)  glm"]
    rows = sorted(((_prefix(r), _data(r), r) for r in replies), key=lambda x: (x[0], x[1].get("worker", "")))
    for prefix, data, r in rows:
        batches = ", ".join(f"{k} {v['mean_size']}" for k, v in data.get("batches", {}).items())
        glm = data.get("glm", {})
        rejected = sum(data.get("rejected", {}).values())
        lines.append(
            f"{str(r.get('id'))[:22]:<24}{prefix:<10}{sum(data.get('received', {}).values()):>8}"
            f"{data.get('results', 0):>9}{rejected:>9}"
            f"{sum(data.get('rate_limited', {}).values()):>9}{data.get('unacked', 0):>8}  {batches or '-'}  "
            f"{glm.get('backend', '?')} {glm.get('breaker', '')} calls {glm.get('calls', 0)}"
        )
        if data.get("worker"):
            lines.append("  " + worker_line(data))
    if not replies:
        lines.append("(no engine answered)")
    for prefix in sorted({p for p, data, _ in rows if data.get("worker")}):
        lines.append(coverage(prefix, [data for p, data, _ in rows if p == prefix and data.get("worker")]))
    return "\n".join(lines)


def worker_line(data: dict[str, Any]) -> str:
    """``worker <name>  moves <n>  partitions 0 (lag 3), rest (lag 0)``."""
    lag = data.get("lag") or {}
    owned = ", ".join(f"{p} (lag {lag.get(p, '?')})" for p in data.get("partitions") or [])
    owned = owned or "none (standing by)"
    return f"worker {data['worker']}  moves {data.get('moves', 0)}  partitions {owned}"


def coverage(prefix: str, workers: list[dict[str, Any]]) -> str:
    """Who owns what on one prefix: a partition nobody answering owns (a
    failover or a join under way) or owned twice shows here, and so does a
    worker the leases bucket lists that did not answer."""
    owners: dict[str, int] = {}
    for data in workers:
        for p in data.get("partitions") or []:
            owners[p] = owners.get(p, 0) + 1
    slots = sorted({s for data in workers for s in data.get("slots") or []} | set(owners), key=_slot_order)
    live = {w for data in workers for w in data.get("workers") or []}
    silent = sorted(live - {data["worker"] for data in workers})
    line = f"{prefix}: {len(workers)} worker{'s' * (len(workers) != 1)} answering"
    if silent:
        line += f" ({len(silent)} more in the leases bucket: {', '.join(silent)})"
    unowned = [s for s in slots if s not in owners]
    twice = [s for s in slots if owners.get(s, 0) > 1]
    if not unowned and not twice:
        return f"{line}; all {len(slots)} partitions owned"
    if unowned:
        line += f"; unowned: {', '.join(unowned)}"
    if twice:
        line += f"; owned twice: {', '.join(twice)}"
    return line


def _slot_order(slot: str) -> tuple[bool, int, str]:
    return (not slot.isdigit(), int(slot) if slot.isdigit() else 0, slot)


def _data(reply: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = (reply.get("endpoints") or [{}])[0].get("data") or {}
    return data


def _prefix(reply: dict[str, Any]) -> str:
    return str((reply.get("metadata") or {}).get("subject_prefix", "?"))
