"""What follows a source from worker to worker: its GLM history and the last
frame sent to the model (``on_change``), as one compact value.

One orjson document per source::

    {"v": 1,
     "h": [[start_ns, end_ns, "answer"], ...],           # oldest first
     "s": {"e": end_ns,                                   # or null: nothing sent yet
           "m": {"image": {"u": {summary}, "b": "<base64 float32>" | null, "k": "<vocabulary>"}}}}

Embeddings travel as their float32 bytes in base64 (5.3 bytes a dimension,
where JSON numbers take about 10); summaries as the result records publish
them. A vocabulary travels by its :func:`~engine.glm.trigger.vocabulary_key`
and comes back :class:`~engine.glm.trigger.Recalled`, bound to the live one
by the source's next frame. Nothing here knows where the value is kept
(:mod:`engine.glm.memory`).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from engine.contracts.types import MODALITIES, Modality, ModalityFusion
from engine.glm.prompts import Answer
from engine.glm.trigger import Recalled, Snapshot, vocabulary_key

VERSION = 1


@dataclass(frozen=True, slots=True)
class SourceState:
    """A source's GLM context: its answers so far and the last frame sent."""

    history: tuple[Answer, ...] = ()
    snapshot: Snapshot | None = None


def encode(state: SourceState) -> bytes:
    doc: dict[str, Any] = {"v": VERSION, "h": [[a.start_ns, a.end_ns, a.text] for a in state.history]}
    snap = state.snapshot
    doc["s"] = (
        None if snap is None else {"e": snap.end_ns, "m": {m: _fusion(f) for m, f in snap.modalities.items()}}
    )
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _fusion(f: ModalityFusion) -> dict[str, Any]:
    emb = None
    if f.embedding is not None:
        emb = base64.b64encode(np.ascontiguousarray(f.embedding, np.float32).reshape(-1).tobytes()).decode()
    return {"u": f.summary, "b": emb, "k": vocabulary_key(f.vocabulary)}


def decode(data: bytes) -> SourceState:
    """The state ``data`` holds; :class:`ValueError` when it holds none this
    version can read (another version's, or damaged)."""
    try:
        doc = orjson.loads(data)
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise ValueError(f"not a version {VERSION} GLM state")
        history = tuple(Answer(int(s), int(e), str(t)) for s, e, t in doc["h"])
        snap = doc["s"]
        if snap is None:
            return SourceState(history)
        mods: dict[Modality, ModalityFusion] = {}
        for m, f in snap["m"].items():
            if m not in MODALITIES:
                raise ValueError(f"unknown modality {m!r}")
            emb = None if f["b"] is None else np.frombuffer(base64.b64decode(f["b"]), np.float32)
            summary = f["u"]
            if not isinstance(summary, dict):
                raise ValueError("a summary that is not an object")
            mods[m] = ModalityFusion((), (), summary, emb, vocabulary=Recalled(key=str(f["k"])))
        return SourceState(history, Snapshot(int(snap["e"]), mods, recalled=True))
    except ValueError:
        raise
    except (KeyError, TypeError, AttributeError) as exc:  # valid JSON of another shape
        raise ValueError(f"not a GLM state: {type(exc).__name__}: {exc}") from exc
