"""A blocking source on a thread of its own, as an async iterator, dropping
rather than queueing when the consumer is slower.

A camera does not wait for the network: when the producer falls behind
(a slow engine in durable mode, a slow link), holding frames back would turn
"live" into "a growing minute ago". So with ``drop=True`` at most ``depth``
items wait and a new one that finds no room is dropped and counted. With
``drop=False`` (a file sent as fast as possible, standard input) the reader
waits for room instead: nothing is lost, and memory stays bounded either way.

The reader runs on a daemon thread, not the event loop's executor: a stream
that blocks in FFmpeg must not hold up the program's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Generic, TypeVar

from engine.contracts.errors import AutoGLMError, SourceError

T = TypeVar("T")


class _End:
    """The reader finished (``error`` None) or failed."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class Pump(Generic[T]):
    """``async for item in Pump(read)``, where ``read(stop)`` yields items until ``stop`` is set."""

    def __init__(self, read: Callable[[threading.Event], Iterator[T]], *, drop: bool, depth: int = 8) -> None:
        self.read, self.drop, self.depth = read, drop, depth
        self.dropped = 0
        self.stop = threading.Event()
        self._queue: asyncio.Queue[T | _End] | None = None

    def finish(self) -> None:
        """Stop reading (Ctrl-C): what was read so far is still handed out, then
        the iteration ends, even while the reader is blocked (standard input
        that says nothing, a stream gone quiet). From the event loop's thread."""
        self.stop.set()
        if self._queue is not None:
            self._queue.put_nowait(_End(None))

    async def __aiter__(self) -> AsyncIterator[T]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[T | _End] = asyncio.Queue()
        self._queue = queue
        room = threading.Semaphore(self.depth)

        def hand_over(item: T | _End) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is reading any more
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> None:
            try:
                for item in self.read(self.stop):
                    if self.drop:
                        if not room.acquire(blocking=False):
                            self.dropped += 1
                            continue
                    else:
                        while not room.acquire(timeout=0.2):
                            if self.stop.is_set():
                                return
                    hand_over(item)
                hand_over(_End(None))
            except AutoGLMError as exc:
                hand_over(_End(exc))
            except Exception as exc:  # a bug or a library's surprise: still one line, not a hang
                hand_over(_End(SourceError(f"reading failed: {type(exc).__name__}: {exc}")))

        thread = threading.Thread(target=run, name="autoglm-source", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                room.release()
                yield item
        finally:
            self.stop.set()
