"""``autoglm distill``: small random-weight models and a few dozen generated frames.

A random ResNet-18 teaches a random MobileNetV3-Small on 40 generated
64 x 64 frames: the loss goes down, the student's agreement with the teacher
on the held-out frames rises above the untrained student's, the output
loads as an image route's model, and a second run resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from engine.tools.cli import main
from engine.tools.fidelity import generated_frames
from processors.registry import lookup


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("frames")
    for i, f in enumerate(generated_frames(40, 96, seed=5)):
        cv2.imwrite(str(root / f"f{i:03d}.png"), f[..., ::-1])
    return root


def test_distilled_student_learns_the_teacher_and_loads_as_a_route(
    frames: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models"
    args = ["distill", "--teacher", "resnet18", "--frames", str(frames), "--out", str(out)]
    args += ["--teacher-weights", "random", "--input-size", "64"]
    assert main([*args, "--epochs", "4"]) == 0
    text = capsys.readouterr().out
    losses = [float(line.split("loss ")[1]) for line in text.splitlines() if line.startswith("epoch ")]
    assert len(losses) == 4 and losses[-1] < losses[0] / 2
    meta = json.loads((out / "mobilenet_v3_small.distilled.pt.json").read_text())
    before, after = meta["before"], meta["after"]
    assert after["cosine"] > before["cosine"] + 0.2
    assert after["top1"] >= before["top1"]
    assert after["teacher_items_s"] > 0 and after["student_items_s"] > 0

    path = out / "mobilenet_v3_small.distilled.pt"
    route = lookup("cnn").create(
        {"weights": "imagenet", "weights_path": str(path), "input_size": 64, "faces": False}, "image", "cpu"
    )
    assert route.weight_files == (str(path),) and len(route.labels) == 1000

    assert main([*args, "--epochs", "5", "--resume"]) == 0  # one more epoch, from the checkpoint
    text = capsys.readouterr().out
    assert "resuming after epoch 4" in text and "epoch 5/5" in text and "epoch 1/5" not in text
