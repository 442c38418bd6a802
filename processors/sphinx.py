"""pocketsphinx in a process of its own.

pocketsphinx's decoder holds the GIL for the whole of an utterance (measured:
every other thread paused for 4.8 s while it read 17 s of speech), which
would stall the event loop, the other routes and the NATS client with it. Fed
in pieces it still holds it through ``end_utt``'s search, and reads worse
(its normalisation starts cold). So the decoder lives in a child process
(``python -m processors.sphinx``): the route's thread waits on a pipe with
the GIL released, and the decoding runs on another core.

A plain child over pipes rather than ``multiprocessing``: spawning re-imports
the parent's ``__main__``, which is not always a file (``python -c``, a
REPL). The protocol is a 4-byte length then the bytes, each way: s16le mono
16 kHz in, UTF-8 words out. A child that died is started again on the next
utterance. This module imports nothing heavy (numpy; the engine only when a
parent builds it): the child loads pocketsphinx and nothing else.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

RATE = 16_000
_LEN = struct.Struct("<I")


def _read(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (n,) = _LEN.unpack(head)
    return stream.read(n)


def _write(stream: IO[bytes], data: bytes) -> None:
    stream.write(_LEN.pack(len(data)) + data)
    stream.flush()


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """The child: load the wheel's US-English models, say so, then transcribe until EOF."""
    from pocketsphinx import Decoder

    decoder = Decoder(samprate=RATE, loglevel="FATAL")
    _write(out, b"ready")
    while (pcm := _read(inp)) is not None:
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        _write(out, (str(hyp.hypstr).strip() if hyp is not None else "").encode())


def _stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()


class Pocketsphinx:
    """The wheel's US-English models in a child process; one utterance at a time."""

    def __init__(self) -> None:
        from engine.contracts.errors import ConfigError

        try:
            import pocketsphinx  # noqa: F401  (a clear error here, not in the child)
        except ImportError as exc:
            raise ConfigError(["asr backend = 'pocketsphinx' needs: pip install pocketsphinx"]) from exc
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._finalizer: Any = None
        with self._lock:
            self._start()  # the models load before the first event, and a failure shows at build

    def _start(self) -> subprocess.Popen[bytes]:
        root = str(Path(__file__).resolve().parent.parent)  # where ``processors`` is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        child = subprocess.Popen(
            [sys.executable, "-m", "processors.sphinx"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert child.stdout is not None
        if _read(child.stdout) != b"ready":
            _stop(child)
            raise RuntimeError(f"the pocketsphinx child exited with {child.wait()} before it was ready")
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _stop, child)
        self._child = child
        return child

    def transcribe(self, utterances: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        out = []
        with self._lock:
            for u in utterances:
                pcm = (np.clip(u, -1.0, 1.0) * 32767).astype("<i2").tobytes()
                alive = self._child is not None and self._child.poll() is None
                child = self._child if alive and self._child is not None else self._start()
                assert child.stdin is not None and child.stdout is not None
                try:
                    _write(child.stdin, pcm)
                    words = _read(child.stdout)
                except (BrokenPipeError, OSError) as exc:
                    raise RuntimeError("the pocketsphinx child died; it starts again next time") from exc
                if words is None:
                    raise RuntimeError("the pocketsphinx child died; it starts again next time")
                out.append(words.decode())
        return out

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
