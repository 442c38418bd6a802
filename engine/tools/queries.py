"""The commands that ask or tell running engines: status, health, models, ab report, reload."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from engine.config.models import (
    NATS_URL_ENV,
)
from engine.contracts.subjects import Subjects
from engine.tools.options import open_nats, read_config


def reload_line(report: dict[str, Any]) -> str:
    if not report["ok"]:
        return "refused, the running config stays:\n  " + "\n  ".join(report["errors"])
    line = f"applied: {', '.join(report['applied']) or 'nothing changed'}"
    if report["restart_required"]:
        line += f"; needs a restart (running values kept): {', '.join(report['restart_required'])}"
    return line


async def cmd_reload(args: argparse.Namespace) -> int:
    from engine.observe.service import reload_all

    nc, _ = await open_nats(args)
    try:
        reports = await reload_all(nc, args.prefix, timeout=args.timeout)
    finally:
        await nc.close()
    for r in reports:
        print(f"{r['id']} ({r['prefix']}): {reload_line(r)}")
    if not reports:
        print("no engine answered", file=sys.stderr)
        return 1
    return 0 if all(r["ok"] for r in reports) else 2


async def cmd_status(args: argparse.Namespace) -> int:
    import orjson

    from engine.observe.service import find_engines, status_table
    from engine.transport.security import redact_url

    nc, nats = await open_nats(args)
    url = redact_url(nats.url or "")
    try:
        if args.info:  # the raw $SRV.INFO replies, as NATS tooling sees them
            for info in await find_engines(nc, verb="INFO"):
                print(orjson.dumps(info).decode())
            return 0
        while True:
            table = status_table(await find_engines(nc))
            if args.once:
                print(table)
                return 0
            print("\x1b[2J\x1b[H" + time.strftime("%H:%M:%S ") + url + "\n" + table, flush=True)
            await asyncio.sleep(args.interval)
    finally:
        await nc.close()


async def cmd_models(args: argparse.Namespace) -> int:
    from engine.observe.service import find_engines
    from engine.tools.experiments import models_table

    nc, _ = await open_nats(args)
    try:
        print(models_table(await find_engines(nc)))
    finally:
        await nc.close()
    return 0


async def cmd_ab_report(args: argparse.Namespace) -> int:
    from engine.observe.service import find_engines
    from engine.tools.experiments import Report, results_since, shadows_of

    cfg = read_config(args.config)
    nc, _ = await open_nats(args)
    report = Report()
    try:
        async for result in results_since(nc, cfg, args.since):
            report.add(result)
        prefix = cfg.nats.subject_prefix
        replies = [
            r for r in await find_engines(nc) if (r.get("metadata") or {}).get("subject_prefix") == prefix
        ]
    finally:
        await nc.close()
    print(report.text(shadows_of(replies)))
    return 0


async def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when an engine answers on ``<prefix>.svc.health`` (container HEALTHCHECK)."""
    import orjson

    from engine.transport.security import redact_url

    cfg = read_config(args.config)
    url = args.nats_url or os.environ.get(NATS_URL_ENV) or cfg.nats.url
    if not url:  # an engine on its embedded server writes the URL beside its data
        url_file = Path(cfg.nats.data_dir) / "run" / "engine.url"
        url = url_file.read_text().strip() if url_file.exists() else None
        secure_env = Path(cfg.nats.data_dir) / "secure" / "engine.env"
        if url and not args.auth_file and secure_env.exists():  # started with --secure
            args.auth_file = str(secure_env)
    if not url:
        print("autoglm health: no NATS url and no running embedded engine found", file=sys.stderr)
        return 1
    args.nats_url = url
    nc, _ = await open_nats(args, timeout=args.timeout)
    try:
        health = Subjects(cfg.nats.subject_prefix).service("health")
        reply = await nc.request(health, b"", timeout=args.timeout)
    except Exception as exc:  # no responders / timeout: no healthy engine
        shown = redact_url(url)
        print(f"autoglm health: no engine answered on {shown}: {type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        await nc.close()
    report = orjson.loads(reply.data)
    print(report)
    if report.get("status") == "unhealthy":
        print(f"autoglm health: engine unhealthy: {report.get('failure')}", file=sys.stderr)
        return 1
    return 0
