"""Edge deployment: ``autoglm export`` and the image route on ONNX Runtime, without torch.

One export (random-weight MobileNet at 64 x 64, fp32 and static int8) is
shared by the module. The end-to-end test runs ``autoglm run`` in a process
where importing torch, torchvision or transformers fails, as in the edge
image, over a real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from engine.contracts.errors import ConfigError
from engine.contracts.types import ContentType, InputEvent
from engine.contracts.versions import weights_version
from engine.tools.cli import main
from engine.tools.export import Exported, export_image
from engine.tools.export_text import export_text, sample_sentences
from engine.tools.fidelity import cosines, generated_frames
from processors.params import ImageParams, TextParams
from processors.registry import lookup
from tests.conftest import ROOT, _spawned, collect, send

SIZE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    out = tmp_path_factory.mktemp("models")
    done = export_image(ImageParams(input_size=SIZE, faces=False), out, int8="static", samples=16)
    return {e.precision: e for e in done}


@pytest.fixture(scope="module")
def exported_text(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    out = tmp_path_factory.mktemp("text-models")
    return {e.precision: e for e in export_text(TextParams(), out, int8=True, samples=16)}


def _jpeg(seed: int) -> bytes:
    frame = generated_frames(1, 96, seed)[0]
    return bytes(cv2.imencode(".jpg", frame[..., ::-1])[1].tobytes())


def _event(seed: int, source: str = "cam") -> InputEvent:
    return InputEvent(
        subject=f"t.in.{source}.image",
        source=source,
        modality="image",
        ts_ns=time.time_ns(),
        content_type=ContentType("image/jpeg"),
        payload=_jpeg(seed),
        event_id=f"e{seed}",
    )


def test_export_writes_each_model_with_its_identity_and_checks(exported: dict[str, Exported]) -> None:
    assert set(exported) == {"fp32", "int8-static"}
    for e in exported.values():
        meta = json.loads(Path(f"{e.path}.json").read_text())
        assert meta["version"] == e.version == weights_version([e.path])
        assert meta["input_size"] == SIZE and meta["precision"] == e.precision
        assert meta["source"]["model"] == "mobilenet_v3_small"
    assert exported["fp32"].fidelity.cosine_min > 0.999
    assert exported["int8-static"].fidelity.cosine_mean >= 0.97
    assert exported["int8-static"].path.stat().st_size < exported["fp32"].path.stat().st_size / 2
    assert exported["fp32"].version != exported["int8-static"].version


@pytest.mark.parametrize("precision", ["fp32", "int8-static"])
def test_onnx_route_gives_torch_s_embeddings_batch_by_batch(
    exported: dict[str, Exported], precision: str
) -> None:
    spec = lookup("cnn")
    common = {"input_size": SIZE, "faces": False}
    ref = spec.create(common, "image", "cpu")
    onnx = spec.create(
        {**common, "runtime": "onnx", "onnx_path": str(exported[precision].path)}, "image", "cpu"
    )
    events = [_event(i, f"cam{i % 3}") for i in range(7)]
    want = ref.run([ref.prepare(e) for e in events])
    got = onnx.run([onnx.prepare(e) for e in events])
    a = np.stack([f.embedding for f in got])
    b = np.stack([f.embedding for f in want])
    floor = 0.999 if precision == "fp32" else 0.95
    assert cosines(a, b).min() > floor
    assert [f.stats.keys() for f in got] == [f.stats.keys() for f in want]
    assert onnx.weight_files == (str(exported[precision].path),)  # versioned by the .onnx bytes


@pytest.mark.parametrize("precision", ["fp32", "int8-dynamic"])
def test_onnx_text_route_gives_torch_s_embeddings_and_token_counts(
    exported_text: dict[str, Exported], precision: str
) -> None:
    spec = lookup("minilm")
    common = {"max_tokens": 24}  # some sample sentences are longer: truncation is exercised
    ref = spec.create(common, "text", "cpu")
    path = str(exported_text[precision].path)
    onnx = spec.create({**common, "runtime": "onnx", "onnx_path": path}, "text", "cpu")
    events = [
        InputEvent(
            f"t.in.s{i}.text", f"s{i}", "text", time.time_ns(), ContentType("text/plain"), s.encode(), f"x{i}"
        )
        for i, s in enumerate([*sample_sentences(6, seed=3), "Ångström café naïve 東京"])
    ]
    want = ref.run([ref.prepare(e) for e in events])
    got = onnx.run([onnx.prepare(e) for e in events])
    assert [f.stats for f in got] == [f.stats for f in want]  # same tokens, same truncation
    assert any(f.stats["truncated"] for f in got)
    floor = 0.999 if precision == "fp32" else 0.97
    assert cosines(np.stack([f.embedding for f in got]), np.stack([f.embedding for f in want])).min() > floor


def test_onnx_route_config_errors_name_key_and_value(exported: dict[str, Exported], tmp_path: Path) -> None:
    spec = lookup("cnn")
    with pytest.raises(ValueError, match="onnx_path"):
        spec.create({"runtime": "onnx"}, "image", "cpu")
    missing = str(tmp_path / "nope.onnx")
    with pytest.raises(ConfigError, match=r"params\.onnx_path = '.*nope\.onnx'"):
        spec.create({"runtime": "onnx", "onnx_path": missing, "faces": False}, "image", "cpu")
    path = str(exported["fp32"].path)
    with pytest.raises(ConfigError, match=rf"params\.input_size = 224: .* takes {SIZE} x {SIZE}"):
        spec.create({"runtime": "onnx", "onnx_path": path, "faces": False}, "image", "cpu")


def test_export_refuses_to_write_below_the_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "routing.toml"
    cfg.write_text(
        f'[[routes]]\nmodality = "image"\nprocessor = "cnn"\n[routes.params]\ninput_size = {SIZE}\n'
    )
    out = tmp_path / "models"
    args = ["export", "--config", str(cfg), "--out", str(out), "--samples", "8"]
    assert main([*args, "--int8", "dynamic", "--min-cosine-int8", "1.01"]) == 1
    err = capsys.readouterr().err
    assert "mobilenet_v3_small.int8.onnx (int8-dynamic)" in err and "not written" in err
    # the fp32 file passed its own check and stays; nothing else is left behind
    assert sorted(p.name for p in out.iterdir()) == [
        "mobilenet_v3_small.onnx",
        "mobilenet_v3_small.onnx.json",
    ]


#: Runs ``autoglm run`` where torch, torchvision and transformers cannot be
#: imported (as in the edge image), and says on exit whether any got in.
_NO_TORCH = """
import importlib.abc, runpy, sys
BLOCKED = ("torch", "torchvision", "transformers")
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (edge: not installed)", name=name)
        return None
sys.meta_path.insert(0, NoTorch())
import atexit
atexit.register(lambda: print("torch loaded:", any(m.split(".")[0] in BLOCKED for m in sys.modules),
                              file=sys.stderr, flush=True))
sys.argv = ["autoglm", *sys.argv[1:]]
runpy.run_module("engine.tools.cli", run_name="__main__")
"""


async def test_onnx_routes_run_end_to_end_without_torch(
    exported: dict[str, Exported],
    exported_text: dict[str, Exported],
    nats_url: str,
    nc: Any,
    prefix: str,
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "edge.toml"
    cfg.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\ndurable = false\n'
        "[aligner]\nwindow_ms = 50\nidle_timeout_ms = 200\n"
        '[[routes]]\nmodality = "image"\nprocessor = "cnn"\ndevice = "cpu"\n'
        f'[routes.params]\nruntime = "onnx"\nonnx_path = "{exported["int8-static"].path}"\n'
        f"input_size = {SIZE}\n"
        '[[routes]]\nmodality = "text"\nprocessor = "minilm"\ndevice = "cpu"\n'
        f'[routes.params]\nruntime = "onnx"\nonnx_path = "{exported_text["int8-dynamic"].path}"\n'
    )
    launcher = tmp_path / "no_torch.py"
    launcher.write_text(_NO_TORCH)
    out = await collect(nc, f"{prefix}.out.>")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(launcher), "run", "--config", str(cfg), "--nats-url", nats_url,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _spawned.append(proc)
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if b"engine running" not in line:
        proc.kill()
        raise AssertionError(f"{line!r}\n{(await proc.stderr.read()).decode()}")
    for i in range(3):
        await send(nc, prefix, f"cam{i}", "image", _jpeg(i), time.time_ns(), event_id=f"edge-{i}")
    await send(nc, prefix, "cam0", "text", b"smoke near the dock", time.time_ns(), event_id="edge-t")
    await out.wait_events({"edge-0", "edge-1", "edge-2", "edge-t"}, timeout=30)
    text = [b for _, _, b in out.items if "edge-t" in (b.get("events") or {}).get("text", [])]
    assert text and text[0]["models"]["text"]["model"] == "all-MiniLM-L6-v2.int8"
    assert text[0]["models"]["text"]["version"] == exported_text["int8-dynamic"].version
    image = [b for _, _, b in out.items if "image" in b["models"]]
    assert image[0]["models"]["image"]["version"] == exported["int8-static"].version
    proc.terminate()
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert b"torch loaded: False" in err
