"""Waiting until the server has seen what a client sent.

The engine needs it before it reports ready and the producer tools before
they publish; it lives with the transport so neither reaches into the other.
"""

from __future__ import annotations

from typing import Any


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
