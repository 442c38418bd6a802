"""Cost of one result record: build + serialize, dict (before) vs the typed records.

    .venv/bin/python benchmarks/records.py

Interleaved rounds, best of each, so a busy machine skews both sides alike.
"""

from __future__ import annotations

import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from engine.contracts.records import FrameRecord, Glm, Latency, Rejection, Result, frame_record
from engine.contracts.subjects import Subjects
from engine.contracts.types import FusedFrame, ModalityFusion

T = 1_764_000_000_000_000_000
MFCC = [0.12345, -1.5, 2.25, 3.125, -4.0625, 5.5, 6.75, -7.875, 8.0, 9.5, -10.25, 11.125, 12.0]


def _fused(ids: list[str], summary: dict[str, object]) -> ModalityFusion:
    return ModalityFusion(tuple(ids), tuple(T + i for i in range(len(ids))), summary)


FRAME = FusedFrame(
    source="cam3",
    start_ns=T,
    end_ns=T + 200_000_000,
    modalities={
        "image": _fused(
            ["cam3-img-1", "cam3-img-2"],
            {
                "count": 2,
                "embedding_dim": 576,
                "embedding_norm": 12.34567,
                "brightness": 0.41234,
                "faces": 1.0,
                "sharpness": 123.45678,
                "labels": ["person", "chair"],
            },
        ),
        "audio": _fused(
            ["cam3-aud-1", "cam3-aud-2"],
            {
                "count": 2,
                "loudness_dbfs": -23.45678,
                "voiced": 0.5,
                "centroid_hz": 1234.5678,
                "mfcc_mean": MFCC,
                "mfcc_std": MFCC,
            },
        ),
        "text": _fused(["cam3-txt-1"], {"count": 1, "embedding_dim": 384, "texts": ["someone walks by"]}),
    },
    missing=(),
    traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    first_arrival_ns=T,
    closed_ns=T + 250_000_000,
)
PROMPT = "Source cam3, window 0.2 s.\nImage: 2 frames, 1 face.\nAudio: -23 dBFS.\nText: someone walks by."
GLM: Glm = {"backend": "openai", "model": "glm-4v", "latency_ms": 812.345}
LAT: Latency = {"process": 12.345, "align": 201.234, "glm": 812.345, "event_to_result": 1023.456}
REJECTED: dict[str, Any] = {
    "subject": Subjects().input("cam3", "image"), "source": "cam3", "modality": "image", "event_id": "e1",
    "timestamp_ns": str(T), "reason": "unsupported_content_type", "message": "Content-Type 'video/mp4'",
    "rejected_ns": T,
}  # fmt: skip


def as_dicts() -> bytes:  # what engine.py and the GLM stage do today
    record = frame_record(FRAME)
    record.update(prompt=PROMPT, answer="a person walks by", glm=dict(GLM))
    record["latency_ms"] = dict(LAT)
    return orjson.dumps(record)


def constructed() -> bytes:  # pydantic's own model_construct instead of _trusted
    fields = {**frame_record(FRAME), "skipped": None}
    extra = {"prompt": PROMPT, "answer": "a person walks by", "glm": dict(GLM), "latency_ms": dict(LAT)}
    FrameRecord.model_construct(**fields)
    return Result.model_construct(**fields, **extra).to_bytes()


def typed() -> bytes:
    return Result.of(
        FRAME, prompt=PROMPT, answer="a person walks by", glm=dict(GLM), latency_ms=dict(LAT)
    ).to_bytes()  # type: ignore[arg-type]


RECORD = orjson.loads(as_dicts())
MODEL = Result.model_validate(RECORD)
CASES: dict[str, Callable[[], object]] = {
    "result, dict + orjson.dumps (before)": as_dicts,
    "result, Result.of().to_bytes()": typed,
    "result, FrameRecord/Result.model_construct(...).to_bytes()": constructed,
    "result, Result.model_validate(dict).to_bytes()": lambda: Result.model_validate(RECORD).to_bytes(),
    "result, Result.model_validate(dict).model_dump_json()": lambda: Result.model_validate(
        RECORD
    ).model_dump_json(),
    "serialize only, orjson.dumps(dict)": lambda: orjson.dumps(RECORD),
    "serialize only, Result.to_bytes()": MODEL.to_bytes,
    "serialize only, Result.model_dump_json()": MODEL.model_dump_json,
    "serialize only, orjson.dumps(Result.model_dump())": lambda: orjson.dumps(MODEL.model_dump()),
    "rejection, dict + orjson.dumps (before)": lambda: orjson.dumps(dict(REJECTED)),
    "rejection, Rejection(**fields).to_bytes()": lambda: Rejection(**REJECTED).to_bytes(),
}


def main(rounds: int = 30, number: int = 2000) -> None:
    assert as_dicts() == typed() == MODEL.to_bytes()
    best: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(rounds):
        for name, fn in CASES.items():
            best[name].append(min(timeit.repeat(fn, number=number, repeat=3)) / number)
    print(f"one result record: {len(as_dicts())} bytes")
    for name, times in best.items():
        print(f"{min(times) * 1e6:8.2f} µs (median {statistics.median(times) * 1e6:6.2f})  {name}")


if __name__ == "__main__":
    main()
