"""``autoglm plugins``: every processor the engine can route to, and every refused one.

What it prints is what ``autoglm run`` would find right now: the entry
points of the group ``autoglm.processors`` in this Python environment
(:mod:`engine.contracts.plugins`), one line per processor with its package,
version, modalities and origin, then one line per refused plugin with the
reason. A refused plugin is not an error here (the engine runs without it
unless a route names it: ``autoglm validate`` says so), so the exit code is 0.
"""

from __future__ import annotations

import sys
from typing import TextIO

from engine.contracts.plugins import API_VERSION, GROUP, REFUSED, origin_of, registered


def rows() -> list[tuple[str, str, str, str, str]]:
    """(name, modalities, package, version, origin) of each registered processor, by name."""
    out: list[tuple[str, str, str, str, str]] = []
    for name, spec in sorted(registered().items()):
        origin = origin_of(name)
        out.append(
            (name, spec.modality or "any", origin.package or "-", origin.version or "-", origin.source)
        )
    return out


def print_plugins(out: TextIO = sys.stdout) -> int:
    table = [("processor", "modalities", "package", "version", "origin"), *rows()]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for row in table:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[4]]), file=out)
    for name, why in sorted(REFUSED.items()):
        print(f"refused {name}: {why}", file=out)
    print(f"({len(table) - 1} processors from entry points {GROUP!r}, plugin API {API_VERSION})", file=out)
    return 0
