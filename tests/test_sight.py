"""Words in pictures: text read by OCR (English and Chinese) and COCO object labels,
offline; and a route that runs them beside the CNN."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from engine.contracts.errors import ConfigError
from engine.contracts.types import Features
from engine.runtime.build import build_route
from processors.registry import lookup
from tests.conftest import make_config
from tests.test_words import MS, T0, frame, image_event


def test_ocr_reads_english_text_at_most_ocr_fps() -> None:
    ocr = lookup("ocr").create({"ocr_fps": 2}, "image", "cpu")
    body = frame("EXIT 3", "OPEN WINDOW")
    events = [image_event(body, T0 + i * 100 * MS, f"i{i}") for i in range(6)]  # 10 fps for 0.6 s
    feats = ocr.run([ocr.prepare(ev) for ev in events])
    read = [list(f.labels) for f in feats]
    assert read[0] == ["EXIT 3", "OPEN WINDOW"]
    assert read[1:5] == [[]] * 4 and read[5] == read[0]  # 2 per second of event time


def test_rapidocr_runs_beside_the_headless_opencv() -> None:
    """rapidocr-onnxruntime is installed without the opencv-python it declares: one cv2."""
    import rapidocr_onnxruntime  # noqa: F401

    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert "opencv-python-headless" in names and "opencv-python" not in names


#: A CJK font to draw Chinese with (Debian/Ubuntu: apt-get install fonts-wqy-microhei).
CJK_FONTS = [
    Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
    Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"),
]


def test_ocr_reads_chinese_and_english_on_one_frame() -> None:
    import io

    from PIL import Image, ImageDraw, ImageFont

    path = next((p for p in CJK_FONTS if p.exists()), None)
    if path is None:
        pytest.skip("no CJK font to draw with: apt-get install fonts-wqy-microhei")
    font = ImageFont.truetype(str(path), 64)
    img = Image.new("RGB", (640, 480), (40, 40, 40))
    draw = ImageDraw.Draw(img)
    draw.text((40, 80), "安全出口", font=font, fill=(255, 255, 255))
    draw.text((40, 250), "EXIT 3", font=font, fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    ocr = lookup("ocr").create({}, "image", "cpu")
    [f] = ocr.run([ocr.prepare(image_event(buf.getvalue(), T0, "zh"))])
    assert list(f.labels) == ["安全出口", "EXIT 3"]  # "safety exit", top to bottom


def test_detect_needs_its_checkpoint_on_disk_when_the_config_loads(tmp_path: Path) -> None:
    import torch
    import torchvision

    from processors.params import DETECT_CHECKPOINTS, torch_hub_checkpoints

    detection = torchvision.models.detection
    urls = {
        "ssdlite": detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.url,
        "fasterrcnn_mobilenet": detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1.url,
    }
    assert {k: Path(u).name for k, u in urls.items()} == DETECT_CHECKPOINTS
    assert torch_hub_checkpoints() == Path(torch.hub.get_dir()) / "checkpoints"
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError) as err:
        make_config(
            "w",
            routes=[
                {
                    "modality": "image",
                    "processor": "cnn",
                    "also": [{"processor": "detect", "params": {"weights_path": str(missing)}}],
                }
            ],
        )
    problem = str(err.value)
    assert problem.startswith("routes[0].also[0].params = ") and f"no checkpoint at {missing};" in problem


def test_detect_labels_frames_with_coco_names_at_most_detect_fps(tmp_path: Path) -> None:
    """Random weights (shapes and paths, not objects), loaded as a checkpoint would be."""
    import torch
    import torchvision

    from processors.detect import build_detector
    from processors.params import DetectParams

    model, names = build_detector(DetectParams(weights="random"))
    path = tmp_path / "ssdlite.pth"
    torch.save(model.state_dict(), path)
    params = {"weights_path": str(path), "min_score": 0.0, "max_objects": 5, "detect_fps": 2}
    detect = lookup("detect").create(params, "image", "cpu")
    body = frame("EXIT 3")
    feats = detect.run([detect.prepare(image_event(body, T0 + i * 100 * MS, f"d{i}")) for i in range(6)])
    cats = set(torchvision.models.detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.meta["categories"])
    assert 0 < len(feats[0].labels) <= 5 and set(feats[0].labels) <= cats - {"__background__"}
    assert [len(f.labels) for f in feats[1:5]] == [0] * 4 and len(feats[5].labels) > 0
    assert names[1] == "person"


def test_objects_read_as_counted_words() -> None:
    from engine.align.aligner import fuse_modality
    from processors.vocabulary import DETECT
    from tests.test_vocabulary import slot

    frames = [("person", "person", "forklift"), ("person",), ()]
    fused = fuse_modality(
        [slot(f"o{i}", Features("image", labels=f, vocabulary=DETECT), i) for i, f in enumerate(frames)]
    )
    assert fused.summary["objects"] == ["person", "forklift"] and fused.summary["object_counts"] == [2.0, 1.0]
    assert DETECT.describe(fused) == "Objects: person ×2, forklift."


def test_an_event_one_member_refuses_is_refused_and_the_batch_goes_on() -> None:
    from engine.contracts.errors import EventRejected

    config = make_config(
        "w",
        routes=[{"modality": "image", "processor": "cnn", "device": "cpu", "also": [{"processor": "ocr"}]}],
    )
    route = build_route(config.routes[0], "routes[0]")
    good = image_event(frame("EXIT 3"), T0, "good")
    bad = image_event(b"\xff\xd8\xff\xe0 not really a jpeg", T0 + 2_000 * MS, "bad")
    out = route.process([good, bad])
    assert isinstance(out[1], EventRejected) and out[1].reason == "decode_error"
    assert (
        isinstance(out[0], Features) and out[0].embedding is not None and out[0].parts[1].labels == ["EXIT 3"]
    )
