"""One source's card: its last answer, words, sound, what was missing, its windows.

Read from result records as they are on the wire (docs/wire.md): the card
keeps only what the page shows, so a record's features (embeddings' sizes,
MFCCs) are not held per window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from processors.vocabulary import sound_meter

#: Longest text a card or a timeline row carries (the page clips further).
TEXT_CHARS = 400
#: Feature keys whose strings are words a person reads: a transcript, OCR, the text route.
WORD_KEYS = ("texts", "transcript", "transcripts", "ocr", "words")
#: Points in a card's loudness/voice strip (one per window).
STRIP = 30


def _clip(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…"


def words_of(features: dict[str, Any]) -> dict[str, str]:
    """Per modality, the last words its features carry (``text``: the texts,
    ``audio``: a transcript, ``image``: OCR), when a processor put any there."""
    out = {}
    for modality, summary in features.items():
        if not isinstance(summary, dict):
            continue
        for key in WORD_KEYS:
            value = summary.get(key)
            if isinstance(value, str) and value:
                out[modality] = _clip(value)
            elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                out[modality] = _clip(" ".join(value))
    return out


def glm_state(glm: dict[str, Any]) -> str:
    """``answered``, ``failed``, ``skipped:<why>`` or ``none`` (no call by design)."""
    if "error" in glm:
        return "failed"
    if "skipped" in glm:
        return f"skipped:{glm['skipped']}"
    if "model" in glm:
        return "answered"
    return "none"


def window_row(record: dict[str, Any]) -> dict[str, Any]:
    """A timeline row: which modalities arrived, what was fused, missing, skipped."""
    events = record.get("events") or {}
    skipped = record.get("skipped") or {}
    window = record.get("window") or {}
    return {
        "start_ns": window.get("start_ns"),
        "end_ns": window.get("end_ns"),
        "events": {m: len(ids) for m, ids in events.items()},
        "missing": list(record.get("missing") or []),
        "skipped": {why: len(ids) for why, ids in skipped.items()},
        "glm": glm_state(record.get("glm") or {}),
        "answer": _clip(record["answer"]) if isinstance(record.get("answer"), str) else None,
        "event_to_result_ms": (record.get("latency_ms") or {}).get("event_to_result"),
        "rejected": record.get("rejected", {}),
    }


@dataclass
class SourceCard:
    name: str
    seq: int = 0
    seen: float = 0.0
    #: The version of the frame at /frame/<name> (0: none yet).
    frame: int = 0
    results: int = 0
    answer: str | None = None
    answer_window: int | None = None
    glm: str = ""
    words: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    #: Per window: (loudness dBFS, voice ratio) of its audio, for the strip.
    sound: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=STRIP))
    #: Recent refusals of this source's events, by reason (since its last window).
    rejected: dict[str, int] = field(default_factory=dict)
    last_rejection: str | None = None
    #: The last windows' records, slimmed (see window_row), oldest first.
    windows: deque[dict[str, Any]] = field(default_factory=deque)

    def on_result(self, record: dict[str, Any], now: float) -> None:
        self.results += 1
        features = record.get("features") or {}
        self.words.update(words_of(features))
        image = features.get("image") or {}
        if isinstance(image.get("labels"), list):
            self.labels = [str(x) for x in image["labels"]][:5]
        meter = sound_meter(features.get("audio") or {})  # what the audio processor calls them
        if meter is not None:
            self.sound.append(meter)
        self.missing = list(record.get("missing") or [])
        self.skipped = {why: len(ids) for why, ids in (record.get("skipped") or {}).items()}
        self.glm = glm_state(record.get("glm") or {})
        if isinstance(record.get("answer"), str):
            self.answer = _clip(record["answer"])
            self.answer_window = (record.get("window") or {}).get("start_ns")
        slim = {k: record.get(k) for k in ("window", "events", "missing", "skipped", "glm", "answer")}
        slim["latency_ms"] = record.get("latency_ms")
        slim["rejected"], self.rejected = self.rejected, {}
        self.windows.append(slim)

    def on_rejection(self, record: dict[str, Any], now: float) -> None:
        reason = str(record.get("reason") or "?")
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.last_rejection = f"{reason}: {record.get('message', '')}"[:TEXT_CHARS]

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seen": self.seen,
            "frame": self.frame,
            "results": self.results,
            "answer": self.answer,
            "glm": self.glm,
            "words": self.words,
            "labels": self.labels,
            "missing": self.missing,
            "skipped": self.skipped,
            "sound": [[round(db, 1), round(v, 2)] for db, v in self.sound],
            "rejected": self.rejected,
            "last_rejection": self.last_rejection,
        }
