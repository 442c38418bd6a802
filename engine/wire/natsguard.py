"""Two guards at the NATS client boundary that one hostile message must not get past.

1. nats-py decodes every delivered subject (and reply subject) as strict
   UTF-8. NATS subjects are bytes: any client can publish on
   ``autoglm.in.\\xff.text``. The ``UnicodeDecodeError`` ends nats-py's read
   loop while the client still says it is connected: the engine hears
   nothing more, answers no health request, and JetStream delivers into the
   dead socket until it gives up on every event. :func:`install` makes the
   client decode with ``surrogateescape`` instead, so such a message arrives
   like any other and the codec refuses it as ``bad_subject``;
   :func:`printable` turns such a subject into text a record can carry.
2. Whatever else ends that read loop behind our back, :func:`reader_dead`
   says so, and the engine's supervisor fails on it (exit 70) rather than
   stay connected and deaf.

:func:`install` also gives the client :func:`engine.wire.headers.parse_header_lines`,
the same header parsing without nats-py's per-character generator.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client

from engine.wire.headers import parse_header_lines

_installed = False
#: nats-py's own header parser, kept for the test that holds ours equal to it.
NATS_PARSE_HEADER_LINES = Client._parse_header_lines


def install() -> None:
    """Make nats-py's clients decode subjects without ever raising (idempotent)."""
    global _installed
    if _installed:
        return

    def _build_message(
        self: Client, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any
    ) -> Any:
        return self.msg_class(
            subject=subject.decode("utf-8", "surrogateescape"),
            reply=reply.decode("utf-8", "surrogateescape"),
            data=data,
            headers=headers,
            _client=self,
            _sid=sid,
        )

    Client._build_message = _build_message  # type: ignore[method-assign]
    Client._parse_header_lines = staticmethod(parse_header_lines)  # type: ignore[method-assign]
    _installed = True


def printable(text: str) -> str:
    """``text`` with undecodable bytes (kept as surrogates) shown as U+FFFD: JSON-safe."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def reader_dead(nc: Any) -> bool:
    """Connected, yet nats-py's read loop has ended: nothing will ever arrive."""
    task = getattr(nc, "_reading_task", None)
    return bool(nc is not None and nc.is_connected and task is not None and task.done())
