"""Text features on ONNX Runtime: the encoder ``autoglm export --route text`` wrote.

The exported graph takes ``input_ids`` and ``attention_mask`` ``(B, L)``
int64 and gives ``sentence_embedding`` ``(B, H)``, mean-pooled and
L2-normalised inside the graph as :func:`processors.text.mean_pool` does.
Tokenisation is the ``tokenizers`` library on the ``tokenizer.json`` the
export copied beside the model (the sidecar names it): the same Rust
tokenizer transformers' fast tokenizer wraps, without transformers or torch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engine.contracts.errors import ConfigError
from engine.contracts.types import Features, InputEvent, Modality
from processors.onnx_image import open_session, read_sidecar
from processors.params import TextParams
from processors.sentences import PreparedText, decode_text, text_features
from processors.vocabulary import TEXT, TextVocabulary

INPUTS = ("input_ids", "attention_mask")
OUTPUT = "sentence_embedding"


def load_tokenizer(onnx_path: str, name: str, max_tokens: int) -> Tokenizer:
    """The tokenizer file beside the model, truncating at ``max_tokens`` and
    padding to the longest text of a batch (as the torch route asks transformers to)."""
    path = Path(onnx_path).parent / name
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type
        raise ConfigError(
            [f"params.onnx_path = {onnx_path!r}: cannot load its tokenizer {path}: {exc}"]
        ) from exc
    pad = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=pad if pad is not None else 0, pad_token="[PAD]")
    return tok


class OnnxTextProcessor:
    """Sentence embedding ``(H,)`` per text on ONNX Runtime; padded to the longest of a batch."""

    modality: Modality = "text"
    vocabulary: TextVocabulary = TEXT

    def __init__(self, params: TextParams, device: str = "auto") -> None:
        assert params.onnx_path is not None  # TextParams refuses runtime = "onnx" without it
        self.params = params
        meta = read_sidecar(params.onnx_path)
        self.session = open_session(params.onnx_path, device)
        inputs = tuple(i.name for i in self.session.get_inputs())
        if inputs != INPUTS or OUTPUT not in {o.name for o in self.session.get_outputs()}:
            raise ConfigError(
                [
                    f"params.onnx_path = {params.onnx_path!r}: not an `autoglm export` text model "
                    f"(inputs {inputs})"
                ]
            )
        self.tokenizer = load_tokenizer(params.onnx_path, str(meta.get("tokenizer", "")), params.max_tokens)
        #: What the engine versions the model by (engine.contracts.versions).
        self.model_name = str(meta["model"])
        self.weight_files = (str(params.onnx_path),)
        # Like the fast tokenizer it is, not safe to reconfigure from several threads.
        self._lock = threading.Lock()

    def prepare(self, event: InputEvent) -> PreparedText:
        text = decode_text(event.payload, self.params.max_chars)
        with self._lock:
            self.tokenizer.no_truncation()
            n = len(self.tokenizer.encode(text).ids)
        return PreparedText(text, n, n > self.params.max_tokens)

    def run(self, items: Sequence[PreparedText]) -> list[Features]:
        with self._lock:
            self.tokenizer.enable_truncation(self.params.max_tokens)
            encs = self.tokenizer.encode_batch([it.text for it in items])
        ids = np.array([e.ids for e in encs], dtype=np.int64)  # (B, L)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)  # (B, L)
        (vecs,) = self.session.run([OUTPUT], {"input_ids": ids, "attention_mask": mask})
        return text_features(items, np.asarray(vecs, dtype=np.float32))


def create(params: TextParams, modality: Modality, device: str, dtype: str) -> OnnxTextProcessor:
    return OnnxTextProcessor(params, device)
