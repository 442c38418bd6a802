"""The benchmark scripts' own logic (the runs themselves are `make bench`, not tests)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from engine.config.models import parse_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import e2e  # noqa: E402
import plot  # noqa: E402


def test_plot_draws_every_series_to_a_png(tmp_path: Path) -> None:
    step = {"offered": 1000, "rate": 990.0, "p50": 2.0, "p99": 9.0, "p999": 12.0, "err": 0.0}
    lossy = {**step, "offered": 20000, "rate": 12000.0, "p99": 900.0, "err": 0.2}
    data = {
        "rate": 8500,
        "cores": 2,
        "raw_burst": 60000.0,
        "raw": [step],
        "core": [step, lossy],
        "durable": [step],
    }
    out = tmp_path / "bus.png"
    plot.draw(data, out)
    blob = out.read_bytes()
    assert blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) > 20_000


def test_e2e_config_is_the_routing_file_on_real_time_intake(tmp_path: Path) -> None:
    text = e2e.config_text(ROOT / "routing.toml", tmp_path)
    cfg = parse_config(tomllib.loads(text), env={})
    assert cfg.nats.subject_prefix == "e2e" and cfg.glm.backend == "none"
    assert [r.processor for r in cfg.routes] == ["cnn", "mfcc", "minilm"]
    assert [[a.processor for a in r.also] for r in cfg.routes] == [["ocr"], ["vad", "asr"], []]
    assert cfg.routes[1].also[1].params["max_utterance_ms"] == 15000
    assert all(r.intake == "real_time" and r.max_staleness_ms == 1000 for r in cfg.routes)
    assert cfg.routes[0].batch.max_batch_size == 16  # the file's batching is kept
