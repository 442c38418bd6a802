"""The monitor's web side: a Starlette app of GET routes over one MonitorState.

``/`` is the page (plain HTML, CSS and JavaScript shipped in
``engine/monitor/static``: no build step, no CDN, it works offline),
``/events`` the server-sent events it listens to, ``/api/state`` the same
data once, ``/api/source/<name>`` a source's timeline and ``/frame/<name>``
its latest frame. Every route is a GET: the page can read, never publish or
change anything (anything else is 405).

Server-sent events rather than a WebSocket: the data flows one way, the
browser's ``EventSource`` reconnects by itself when the monitor restarts,
and each (re)connection starts with the full state, then only the cards
that changed (:meth:`MonitorState.changes_since`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from engine.monitor.state import MonitorState

STATIC = Path(__file__).parent / "static"
#: How often the stream looks for changes, and sends a comment when there were none.
TICK_S = 0.25
KEEPALIVE_S = 15.0


class _Json(JSONResponse):
    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


def _never() -> bool:
    return False


async def stream(
    state: MonitorState, request: Request, tick: float = TICK_S, closing: Callable[[], bool] = _never
) -> AsyncIterator[bytes]:
    """``update`` events: the full state first, then what changed, at most
    every ``tick`` seconds; a comment line now and then so proxies keep it
    open. It ends when the browser goes or the monitor is ``closing`` (so a
    shutdown need not cancel open streams; the browser reconnects)."""
    seen, quiet = 0, 0.0
    yield b"retry: 1000\n\n"  # reconnect quickly after the monitor restarts
    while not closing() and not await request.is_disconnected():
        if state.seq != seen or seen == 0:
            update = state.changes_since(seen)
            seen = max(1, update["seq"])
            yield b"event: update\nid: %d\ndata: " % seen + orjson.dumps(update) + b"\n\n"
            quiet = 0.0
        elif quiet >= KEEPALIVE_S:
            yield b": keep-alive\n\n"
            quiet = 0.0
        await asyncio.sleep(tick)
        quiet += tick


def build_app(
    state: MonitorState, *, tick: float = TICK_S, closing: Callable[[], bool] = _never
) -> Starlette:
    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        return StreamingResponse(
            stream(state, request, tick, closing),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def snapshot(request: Request) -> Response:
        return _Json(state.changes_since(0))

    async def source(request: Request) -> Response:
        name = request.path_params["name"]
        rows = state.timeline_of(name)
        if rows is None:
            return _Json({"error": f"no source {name!r} seen"}, status_code=404)
        card = state.sources[name].view()
        return _Json({"source": name, "card": card, "windows": rows})

    async def frame(request: Request) -> Response:
        found = state.frames.get(request.path_params["name"])
        if found is None:
            return Response(status_code=404)
        return Response(found.data, media_type=found.content_type, headers={"Cache-Control": "no-store"})

    async def healthz(request: Request) -> Response:
        return _Json({"ok": True, "seq": state.seq, "sources": len(state.sources)})

    return Starlette(
        routes=[
            Route("/", index),
            Route("/events", events),
            Route("/api/state", snapshot),
            Route("/api/source/{name}", source),
            Route("/frame/{name}", frame),
            Route("/healthz", healthz),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )
