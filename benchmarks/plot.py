"""Throughput against p99 latency for increasing offered load, raw NATS and the engine on one chart.

    .venv/bin/python benchmarks/bus.py --json benchmarks/bus.json
    .venv/bin/python benchmarks/plot.py benchmarks/bus.json benchmarks/bus.png

Each point is one paced step of ``benchmarks/bus.py``: x is what was
delivered per second, y the p99 latency from publish to result (log scale),
the label the offered load. A system that keeps up moves right as the load
grows; one that does not bends up (queueing) or stops moving right (loss).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: write a file
import matplotlib.pyplot as plt
import orjson

STYLE = {
    "raw": ("raw nats-py pub → sub", "tab:gray", "o"),
    "core": ("engine, core mode", "tab:blue", "s"),
    "durable": ("engine, durable mode (JetStream)", "tab:orange", "^"),
    "core+prompt": ("engine, core mode, prompt built", "tab:purple", "D"),
    "durable+prompt": ("engine, durable mode, prompt built", "tab:brown", "v"),
}


def draw(data: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    for key, (label, color, marker) in STYLE.items():
        steps = data.get(key)
        if not steps:
            continue
        xs = [s["rate"] for s in steps]
        ys = [max(s["p99"], 0.1) for s in steps]
        ax.plot(xs, ys, marker=marker, color=color, label=label)
        for s, x, y in zip(steps, xs, ys, strict=True):
            lost = f", lost {100 * s['err']:.1f}%" if s["err"] > 0.0001 else ""
            ax.annotate(f"{s['offered']:,}/s{lost}", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)  # fmt: skip
    rate = data.get("rate", 8500)
    ax.axhline(52, color="tab:red", linestyle="--", linewidth=0.8, label="target p99 52 ms")
    ax.axvline(rate, color="tab:green", linestyle=":", linewidth=0.8, label=f"target {rate:,}/s")
    ax.set_yscale("log")
    ax.set_xlabel("delivered events/s (labels: offered)")
    ax.set_ylabel("p99 publish → result (ms, log)")
    ax.set_title(
        f"1 KB text events, {data.get('cores', '?')} cores; raw ceiling {data['raw_burst']:,.0f} msg/s"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no point hidden
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str]) -> int:
    src = Path(argv[1] if len(argv) > 1 else "benchmarks/bus.json")
    out = Path(argv[2] if len(argv) > 2 else src.with_suffix(".png"))
    draw(orjson.loads(src.read_bytes()), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
