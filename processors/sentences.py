"""The torch-free part of the text route: strict UTF-8 and NFC, and the features.

Shared by the transformers encoder (:mod:`processors.text`) and the same
encoder on ONNX Runtime (:mod:`processors.onnx_text`), so both reject the
same bodies and describe a text the same way.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engine.contracts.errors import EventRejected
from engine.contracts.types import Features
from processors.vocabulary import TEXT


def decode_text(payload: bytes, max_chars: int) -> str:
    """Strict UTF-8 -> NFC text; names the byte offset of a bad sequence."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EventRejected(
            "invalid_utf8", f"body is not valid UTF-8: byte {exc.start} ({exc.reason})"
        ) from None
    text = unicodedata.normalize("NFC", text)
    if len(text) > max_chars:
        raise EventRejected("text_too_long", f"text is {len(text)} characters, over max_chars = {max_chars}")
    return text


@dataclass(frozen=True, slots=True)
class PreparedText:
    text: str
    tokens: int  # before truncation
    truncated: bool


def text_features(items: Sequence[PreparedText], vecs: npt.NDArray[np.float32]) -> list[Features]:
    """One :class:`Features` per text, its row of ``(B, H)`` embeddings."""
    return [
        Features(
            "text",
            embedding=vecs[i],
            text=it.text,
            stats={
                "chars": float(len(it.text)),
                "tokens": float(it.tokens),
                "truncated": float(it.truncated),
            },
            vocabulary=TEXT,
        )
        for i, it in enumerate(items)
    ]
