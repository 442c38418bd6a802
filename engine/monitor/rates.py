"""The engines' counters as rates, rows and sums: the monitor's overview.

``$SRV.STATS`` carries each engine's running totals (engine/observe/snapshot.py
``summary``). Two rounds apart, their difference over the time between is a
rate; summed over the engines of a fleet, one line per modality. A total
that went down belongs to an engine that restarted, so its new value is all
rise; an engine seen for the first time adds nothing to that round (its
totals are history, not this second's flow).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def _data(reply: dict[str, Any]) -> dict[str, Any]:
    """The engine's counters in a micro stats reply (every endpoint carries them)."""
    data: dict[str, Any] = (reply.get("endpoints") or [{}])[0].get("data") or {}
    return data


def _prefix(reply: dict[str, Any]) -> str:
    return str((reply.get("metadata") or {}).get("subject_prefix", "?"))


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (``None`` when empty)."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 1)


def _started(reply: dict[str, Any]) -> float | None:
    """``started`` of a micro stats reply (RFC 3339, maybe with nanoseconds) as epoch seconds."""
    text = reply.get("started")
    if not isinstance(text, str):
        return None
    head, dot, frac = text.replace("Z", "+00:00").partition(".")
    if dot:  # at most microseconds for fromisoformat; keep the zone
        digits = "".join(c for c in frac if c.isdigit())
        zone = frac[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def engine_rows(replies: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """One row per engine (worker): who, since when, what it owns, its totals."""
    rows = []
    for reply in replies:
        data = _data(reply)
        started = _started(reply)
        rows.append(
            {
                "id": str(reply.get("id", "?")),
                "prefix": _prefix(reply),
                "version": reply.get("version"),
                "uptime_s": round(now - started, 1) if started is not None else None,
                "status": data.get("status"),
                "worker": data.get("worker"),
                "partitions": data.get("partitions") or [],
                "received": data.get("received") or {},
                "results": data.get("results", 0),
                "rejected": data.get("rejected") or {},
                "rate_limited": data.get("rate_limited") or {},
                "batches": data.get("batches") or {},
                "glm": data.get("glm") or {},
                "unacked": data.get("unacked", 0),
                "durable": data.get("durable"),
            }
        )
    return sorted(rows, key=lambda r: (r["prefix"], r["worker"] or "", r["id"]))


def sum_engines(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fleet as one: per route queue depth and batch sizes, GLM calls, totals."""
    routes: dict[str, dict[str, Any]] = {}
    glm: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for row in rows:
        for name, b in row["batches"].items():
            r = routes.setdefault(name, {"queue": 0, "batches": 0, "sizes": Counter()})
            r["queue"] += int(b.get("queue", 0))
            r["batches"] += int(b.get("batches", 0))
            r["sizes"].update({k: int(v) for k, v in (b.get("sizes") or {}).items()})
        g = row["glm"]
        glm["calls"] += int(g.get("calls", 0))
        glm["errors"] += int(g.get("errors", 0))
        skipped.update({k: int(v) for k, v in (g.get("skipped") or {}).items()})
        counts["received"] += sum(row["received"].values())
        counts["results"] += int(row["results"])
        counts["rejected"] += sum(row["rejected"].values())
        counts["rate_limited"] += sum(row["rate_limited"].values())
    for r in routes.values():
        sizes = r.pop("sizes")
        n = sum(sizes.values())
        r["mean_size"] = round(sum(int(k) * v for k, v in sizes.items()) / n, 2) if n else 0.0
        r["sizes"] = {k: sizes[k] for k in sorted(sizes, key=int)}
    return {
        "routes": routes,
        "glm": {**glm, "skipped": dict(skipped), "skipped_total": sum(skipped.values())},
        "counts": dict(counts),
    }


def _flows(data: dict[str, Any]) -> Counter[str]:
    """The totals a rate is drawn from, by series name."""
    out: Counter[str] = Counter()
    for m, n in (data.get("received") or {}).items():
        out[f"in:{m}"] += int(n)
    for m, n in (data.get("results_events") or {}).items():
        out[f"fused:{m}"] += int(n)
    out["results"] += int(data.get("results", 0))
    for key, n in (data.get("rejected") or {}).items():
        out[f"rejected:{key.split(':', 1)[0]}"] += int(n)
    return out


@dataclass
class Rates:
    """Sparkline series: per name, the last :attr:`history` rates (per second)."""

    history: int = 120
    last: dict[str, tuple[float, Counter[str]]] = field(default_factory=dict)
    series: dict[str, deque[float]] = field(default_factory=dict)
    times: deque[float] = field(default_factory=deque)

    def on_round(self, replies: list[dict[str, Any]], now: float) -> None:
        rise: Counter[str] = Counter()
        span = 0.0
        seen = set()
        for reply in replies:
            key = str(reply.get("id", "?"))
            seen.add(key)
            flows = _flows(_data(reply))
            before = self.last.get(key)
            self.last[key] = (now, flows)
            if before is None:
                continue
            span = max(span, now - before[0])
            for name, value in flows.items():
                old = before[1].get(name, 0)
                rise[name] += value - old if value >= old else value
        for gone in set(self.last) - seen:
            del self.last[gone]
        if span <= 0:
            return
        self.times.append(now)
        names = set(self.series) | set(rise)
        for name in names:
            line = self.series.get(name)
            if line is None:  # a new series starts at zero for the rounds it missed
                line = self.series[name] = deque([0.0] * (len(self.times) - 1))
            line.append(round(rise.get(name, 0) / span, 2))
        for line in (self.times, *self.series.values()):
            while len(line) > self.history:
                line.popleft()

    def view(self) -> dict[str, Any]:
        return {"t": list(self.times), "series": {k: list(v) for k, v in sorted(self.series.items())}}
