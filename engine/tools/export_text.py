"""``autoglm export --route text``: the MiniLM encoder as ONNX (optionally int8), checked.

The graph is the encoder with the route's mean pooling and L2 normalisation
inside (:func:`processors.text.mean_pool`), so :mod:`processors.onnx_text`
needs neither torch nor transformers; the tokenizer's ``tokenizer.json`` is
copied beside it. int8 is ONNX Runtime's dynamic quantisation (weights int8,
activations quantised per batch), the usual choice for transformers: their
time is in MatMuls, which it covers. Per channel: per tensor gave MiniLM a
mean cosine of 0.962 to torch on the sample sentences, per channel 0.9925. Each file is compared with torch on
sample sentences before it is written (:class:`engine.tools.export.ExportRefused`).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.config.models import EngineConfig
from engine.contracts.errors import ConfigError
from engine.contracts.versions import weights_version
from engine.tools.export import OPSET, Exported, ExportRefused, keep_checked
from engine.tools.fidelity import Fidelity, cosines

if TYPE_CHECKING:
    from processors.params import TextParams

#: Words of the sort a site's operators and sensors write.
_TEXT = """camera two sees a person near the loading dock while a forklift reverses slowly
the alarm in hall B stopped after the door closed and the temperature fell
operator reports smoke above line four please check the extractor fan status"""
_WORDS = tuple(_TEXT.split())


def sample_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of 3 to 60 words: short and long, so padding and masks are exercised."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, int(rng.integers(3, 60)))) for _ in range(n)]


def text_params(config: EngineConfig) -> TextParams:
    from processors.params import TextParams

    for i, r in enumerate(config.routes):
        if r.modality == "text" and r.processor == "minilm":
            params = TextParams.model_validate(r.params)
            if params.runtime != "torch":
                raise ConfigError(
                    [f'routes[{i}].params.runtime = "{params.runtime}": export the torch model']
                )
            return params
    raise ConfigError(['--route "text": no route of that modality with processor = "minilm"'])


def _encoder(params: TextParams) -> tuple[Any, Any, Path]:
    """(the encoder with pooling, its tokenizer, the tokenizer.json) on the CPU."""
    import torch

    from processors.text import TextProcessor, mean_pool

    proc = TextProcessor(params, "cpu")

    class _Pooled(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return mean_pool(hidden, attention_mask)

    source = Path(proc.tokenizer.name_or_path)
    tok_file = source / "tokenizer.json"
    if not tok_file.is_file():
        raise ConfigError([f"params.model = {str(source)!r}: no tokenizer.json to ship with the ONNX model"])
    return _Pooled(proc.model).eval(), proc, tok_file


def _compare(path: Path, ids: Any, mask: Any, ref: Any) -> Fidelity:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (emb,) = session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
    cos = cosines(np.asarray(emb, np.float32), ref)
    return Fidelity(len(cos), float(cos.mean()), float(cos.min()), float("nan"))


def export_text(
    params: TextParams,
    out: Path,
    *,
    int8: bool = False,
    min_cosine: float = 0.99,
    min_cosine_int8: float = 0.97,
    samples: int = 32,
) -> list[Exported]:
    import torch
    from onnxruntime import quantization as q

    out.mkdir(parents=True, exist_ok=True)
    model, proc, tok_file = _encoder(params)
    name = proc.model_name
    enc = proc.tokenizer(
        sample_sentences(samples),
        padding=True,
        truncation=True,
        max_length=params.max_tokens,
        return_tensors="pt",
    )
    with torch.inference_mode():
        ref = model(enc["input_ids"], enc["attention_mask"]).numpy()
    ids, mask = enc["input_ids"].numpy(), enc["attention_mask"].numpy()
    tokenizer = f"{name}.tokenizer.json"
    shutil.copyfile(tok_file, out / tokenizer)
    source = weights_version(list(proc.weight_files)) if proc.weight_files else name
    base = {"format": 1, "tokenizer": tokenizer, "max_tokens": params.max_tokens,
            "source": {"model": name, "version": source},
            "exporter": {"torch": torch.__version__, "opset": OPSET}}  # fmt: skip
    fp32_tmp = out / f".{name}.onnx.tmp"
    done: list[Exported] = []
    try:
        batch, length = (
            torch.export.Dim("batch", min=1, max=4096),
            torch.export.Dim("length", min=2, max=4096),
        )
        with warnings.catch_warnings():  # both inputs share the axes: it says so, once per axis
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
            torch.onnx.export(
                model, (enc["input_ids"][:2], enc["attention_mask"][:2]), str(fp32_tmp),
                input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}),
                opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
            )  # fmt: skip
        steps = [("fp32", name, fp32_tmp, min_cosine)]
        if int8:
            steps.append(("int8-dynamic", f"{name}.int8", out / f".{name}.int8.onnx.tmp", min_cosine_int8))
        for precision, stem, tmp, threshold in steps:
            if precision != "fp32":
                q.quantize_dynamic(
                    str(out / f"{name}.onnx"), str(tmp), weight_type=q.QuantType.QInt8, per_channel=True
                )
            fid = _compare(tmp, ids, mask, ref)
            if fid.cosine_mean < threshold:
                raise ExportRefused(
                    f"{stem}.onnx ({precision}): mean embedding cosine to torch {fid.cosine_mean:.4f} "
                    f"< {threshold} on {fid.samples} sentences (min {fid.cosine_min:.4f}); not written"
                )
            meta = {**base, "model": stem, "precision": precision, "checks": fid.as_dict()}
            final = out / f"{stem}.onnx"
            done.append(Exported(final, precision, fid, keep_checked(tmp, final, meta)))
    finally:
        for leftover in out.glob(f".{name}*.onnx.tmp*"):
            leftover.unlink(missing_ok=True)
    return done
