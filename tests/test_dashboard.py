"""The Grafana dashboard in deploy/ asks only for series a running engine exports."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from engine.runtime.engine import Engine
from tests.conftest import eventually, make_config, send

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "autoglm-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["title"]
    for expr in exprs(dash):
        assert expr.count("(") == expr.count(")"), expr
        assert "source" not in expr  # bounded cardinality: no per-source series on the dashboard


async def test_every_series_the_dashboard_queries_is_exported(nc: Any, nats_url: str, prefix: str) -> None:
    engine = Engine(make_config(prefix, nats={"durable": True}, metrics={"port": 0}))  # JetStream series too
    await engine.start(nats_url)
    assert engine.metrics is not None
    await send(nc, prefix, "cam", "text", b"ok", time.time_ns(), event_id="a")
    await send(nc, prefix, "cam", "text", b"x", time.time_ns(), content_type="video/mp4", event_id="b")
    await nc.flush()
    url = f"http://127.0.0.1:{engine.metrics.port}/metrics"

    async def handled() -> str | None:  # the result and the DLQ record counted, both inputs acked
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        done = {"results": 1, "dlq_records": 1, "jetstream_acked": 2}
        return text if all(values.get(f"autoglm_{name}_total") == n for name, n in done.items()) else None

    text = await eventually(handled, "one result and one DLQ record")
    await engine.stop()
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            exported.setdefault(family.name + suffix, set())
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(k for k in sample.labels if k != "le")
    wanted = set()
    for expr in exprs(json.loads(DASHBOARD.read_text())):
        names = re.findall(r"\bautoglm_\w+", expr)
        wanted.update(names)
        for group in re.findall(r"by \(([^)]*)\)", expr):
            labels = {g.strip() for g in group.split(",")} - {"le"}
            for name in names:
                if exported.get(name):  # a family with samples: its labels are known
                    assert labels <= exported[name], f"{expr}: {name} has no label {labels - exported[name]}"
    missing = wanted - set(exported)
    assert not missing, f"the dashboard queries series the engine does not export: {missing}"
    assert len(wanted) >= 15  # it covers the engine, not a token panel
