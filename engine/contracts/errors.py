"""Every error the engine raises, in one tree.

    AutoGLMError
    ├── ConfigError            routing.toml (or a flag) is invalid; ``problems``
    │                          lists ``key = value: reason`` lines
    ├── EventRejected          one event is refused; ``reason`` is the stable
    │   │                      DLQ reason code, the engine keeps running
    │   ├── DecodeError        the payload does not decode (``decode_error``...)
    │   └── LateEvent          event time is behind the aligner (``too_late``)
    ├── ProcessorError         a processor broke on a whole batch (torch error,
    │                          wrong number of outputs); its events are rejected
    │                          with ``processor_error``
    ├── BackpressureError      a bounded queue refused or dropped an item
    ├── TransportError         NATS could not be reached or refused us
    │   └── ServerStartError   the embedded nats-server did not come up
    └── GLMError               the GLM backend failed

Library errors (nats-py, torch, OpenCV, librosa, HTTP) are translated into
these at the boundary with ``raise ... from`` so callers handle one tree.
"""

from __future__ import annotations

from typing import Final

#: Stable reason codes published in DLQ records. Clients may switch on them.
REASONS: Final[frozenset[str]] = frozenset(
    {
        "bad_subject",
        "missing_timestamp",
        "bad_timestamp",
        "missing_content_type",
        "unsupported_content_type",
        "modality_mismatch",
        "bad_header",
        "payload_too_large",
        "image_too_large",
        "audio_too_long",
        "text_too_long",
        "header_too_large",
        "empty_payload",
        "decode_error",
        "invalid_samples",
        "invalid_utf8",
        "too_late",
        "duplicate",
        "overloaded",
        "processor_error",
        "no_route",
        "bad_object_ref",
        "object_missing",
        "object_tampered",
        # A bug met while handling this message (its type and message follow);
        # the engine went on. Report it.
        "internal_error",
        # Delivered nats.max_deliver times without an outcome: given up.
        "poison",
    }
)


class AutoGLMError(Exception):
    """Base class of every error raised by the engine."""


class ConfigError(AutoGLMError):
    """Invalid configuration. ``problems`` holds one line per bad key."""

    def __init__(self, problems: list[str], *, path: str | None = None) -> None:
        self.problems = problems
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(where + "; ".join(problems))


class EventRejected(AutoGLMError):
    """One event was refused. ``reason`` is a code from :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:  # a typo here would break clients silently
            raise ValueError(f"unknown DLQ reason code {reason!r}")
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


class DecodeError(EventRejected):
    """The payload could not be decoded into samples, pixels or text."""


class LateEvent(EventRejected):
    """The event's window has already closed."""

    def __init__(self, message: str) -> None:
        super().__init__("too_late", message)


class ProcessorError(AutoGLMError):
    """A processor failed on a whole batch (not one event's fault)."""


class BackpressureError(AutoGLMError):
    """A bounded queue refused an item or dropped one to make room."""


class TransportError(AutoGLMError):
    """NATS could not be reached, or refused the connection."""


class ServerStartError(TransportError):
    """The embedded nats-server failed to start or to become ready."""


class GLMError(AutoGLMError):
    """The GLM backend failed (timeout, HTTP error, model error)."""


class SourceError(AutoGLMError):
    """A media or text input could not be opened or read: a missing or
    unreadable file, an unreachable stream, a format or codec FFmpeg cannot
    decode. The message is one line that names the input."""
