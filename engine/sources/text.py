"""Lines of text as text events: a file (``--follow`` tails it) or standard input.

One non-empty line is one event, stamped when it is read: a caption file
or a log has no event time of its own that the engine could trust. The
bytes go out as they are (minus the line end): a line that is not UTF-8 is
the engine's to refuse (``invalid_utf8``, with the byte offset), not the
producer's to mend.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO

from engine.contracts.errors import SourceError
from engine.sources.media import Item

TEXT_TYPE = "text/plain;charset=utf-8"
#: How often a followed file is looked at again when it has nothing new.
POLL_S = 0.1


class TextReader:
    """Reads ``path`` (``-``: standard input); :meth:`items` yields one event per line."""

    def __init__(self, path: str, *, follow: bool = False) -> None:
        if follow and path == "-":
            raise SourceError("--follow is for a file; standard input is followed anyway")
        self.path, self.follow = path, follow
        self.lines = 0

    def _open(self) -> BinaryIO:
        if self.path == "-":
            # A reader of its own on a copy of the descriptor, not sys.stdin: a
            # thread blocked in sys.stdin's reader holds its lock, and the
            # interpreter, closing sys.stdin at exit (Ctrl-C), dies on that lock.
            return os.fdopen(os.dup(sys.stdin.fileno()), "rb")
        try:
            return open(self.path, "rb")  # closed by items()
        except IsADirectoryError as exc:
            raise SourceError(f"{self.path}: is a directory, not a file") from exc
        except FileNotFoundError as exc:
            raise SourceError(f"{self.path}: no such file") from exc
        except OSError as exc:
            raise SourceError(f"{self.path}: cannot read: {exc.strerror or exc}") from exc

    def items(self, stop: threading.Event) -> Iterator[Item]:
        """Every line until the end (or, following, until ``stop`` is set)."""
        stream = self._open()
        try:
            pending = b""  # a line still being written when we read it
            while not stop.is_set():
                chunk = stream.readline()
                if not chunk:
                    if not self.follow:
                        break
                    if self._truncated(stream):
                        stream.seek(0)  # rotated in place (truncated): start again at its top
                    stop.wait(POLL_S)
                    continue
                pending += chunk
                if not pending.endswith(b"\n") and self.follow:
                    continue
                line, pending = pending.rstrip(b"\r\n"), b""
                if line.strip():
                    self.lines += 1
                    yield Item("text", time.time_ns(), line, TEXT_TYPE)
            if pending.strip() and not stop.is_set():  # a last line with no newline
                self.lines += 1
                yield Item("text", time.time_ns(), pending.rstrip(b"\r\n"), TEXT_TYPE)
        finally:
            stream.close()

    def _truncated(self, stream: BinaryIO) -> bool:
        try:
            return os.fstat(stream.fileno()).st_size < stream.tell()
        except OSError:
            return False
