"""Reaching the server from a client: connecting with one clear error, and
waiting until the server has seen what the client sent.

The engine needs the wait before it reports ready, the producer tools,
:mod:`engine.sources` and the results consumer connect and wait before they
publish or read; it lives with the transport so none reaches into another.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import nats

from engine.config.nats import redact_url, server_urls
from engine.contracts.errors import TransportError


async def sync_with_server(nc: Any) -> None:
    """Return once the server has processed everything this client sent.

    nats-py 2.16's ``flush()`` writes its PING straight to the socket while
    commands such as SUB wait in the pending buffer for the flusher task, so
    one flush can come back before a new subscription is known to the
    server, and messages published meanwhile are missed (seen in our tests).
    The second round trip starts after the flusher has run.
    """
    await nc.flush()
    await nc.flush()


async def connect(url: str, timeout: float = 5.0, **kwargs: Any) -> Any:
    """nats-py connect with one clear error instead of an endless first-connect loop.
    ``url`` may name several servers, comma-separated (a cluster's nodes).

    A caller's ``error_cb`` still gets every error; this one only keeps the
    last few to name the cause of a failed connect."""
    seen: deque[Exception] = deque(maxlen=8)
    theirs = kwargs.pop("error_cb", None)

    async def remember(exc: Exception) -> None:
        # nats-py reports each failed attempt here and then raises a generic
        # "no servers"; keep the real cause (authorization violation, TLS) for the message.
        seen.append(exc)
        if theirs is not None:
            await theirs(exc)

    kwargs["error_cb"] = remember
    # nats-py retries a refused first connect forever unless the attempts are
    # bounded (0 means unbounded there): two tries, half a second apart.
    kwargs.setdefault("max_reconnect_attempts", 1)
    kwargs.setdefault("reconnect_time_wait", 0.5)
    try:
        return await asyncio.wait_for(nats.connect(server_urls(url), connect_timeout=2, **kwargs), timeout)
    except Exception as exc:  # nats-py raises several unrelated types here
        # The server's -ERR says why; a reset read first (a TCP race) says nothing.
        telling = [e for e in seen if "Violation" in str(e) or "SSL" in str(e) or "certificate" in str(e)]
        pick = telling or seen
        cause = f" ({pick[-1]})" if pick and str(pick[-1]) != str(exc) else ""
        raise TransportError(f"cannot connect to NATS at {redact_url(url)}: {exc}{cause}") from exc
