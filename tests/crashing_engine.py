"""``autoglm`` whose passthrough processor takes the whole process down (SIGKILL to
itself, as a decoder's segfault or the OOM killer would) on a payload that starts
with ``CRASH``: no ``try`` can catch that. Run as ``python -m tests.crashing_engine run ...``."""

from __future__ import annotations

import os
import signal
import sys

import processors.passthrough as passthrough
from engine.contracts.types import InputEvent
from engine.tools.cli import main

_prepare = passthrough.PassthroughProcessor.prepare


def _crash_on_crash(self: passthrough.PassthroughProcessor, event: InputEvent) -> int:
    if event.payload.startswith(b"CRASH"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _prepare(self, event)


passthrough.PassthroughProcessor.prepare = _crash_on_crash  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
