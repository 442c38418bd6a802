"""Processors own their feature vocabulary: how features fuse, read in a prompt
and move the change trigger. A processor registered here, with a feature the
core has never heard of, gets all three without a change to the engine."""

from __future__ import annotations

import ast
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.align.aligner import Aligner, _fuse_many, _fuse_one, _Slot, fuse_modality
from engine.config.models import AlignerConfig
from engine.contracts.errors import EventRejected
from engine.contracts.types import (
    Features,
    FusedFeatures,
    FusedFrame,
    InputEvent,
    Modality,
    ModalityFusion,
    Vocabulary,
)
from engine.contracts.vocabulary import DEFAULT_VOCABULARY, FeatureVocabulary
from engine.glm.prompts import prompt_values
from engine.glm.trigger import ChangeTrigger, change_score, snapshot
from engine.runtime.engine import Engine
from processors import registry
from processors.params import PassthroughParams
from processors.vocabulary import AUDIO, IMAGE, TEXT, AudioVocabulary
from tests.chat_server import ChatServer
from tests.conftest import collect, make_config, send

MS = 1_000_000
S = 1_000 * MS
ROOT = Path(__file__).resolve().parent.parent


# -- a third-party processor: a barometer, its feature unknown to the engine -------------


@dataclass(frozen=True, slots=True)
class PressureVocabulary:
    """A window reads as its peak pressure and the spread; 5 kPa is a new weather."""

    def fuse(self, features: Sequence[Features]) -> FusedFeatures:
        kpa = [f.stats["pressure_kpa"] for f in features]
        return FusedFeatures({"pressure_kpa": max(kpa), "pressure_span_kpa": round(max(kpa) - min(kpa), 3)})

    def describe(self, fusion: ModalityFusion) -> str:
        s = fusion.summary
        return f"barometer peaks at {s['pressure_kpa']} kPa (spread {s['pressure_span_kpa']})"

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        if before is None or now is None:
            return 0.0
        step = float(now.summary["pressure_kpa"]) - float(before.summary["pressure_kpa"])  # type: ignore[arg-type]
        return min(1.0, abs(step) / 5.0)


PRESSURE = PressureVocabulary()


class Barometer:
    """Text bodies such as ``101.3``: kilopascals."""

    vocabulary: Vocabulary = PRESSURE

    def __init__(self, modality: Modality) -> None:
        self.modality = modality

    def prepare(self, event: InputEvent) -> float:
        try:
            return float(event.payload)
        except ValueError:
            raise EventRejected("decode_error", "not a number of kPa") from None

    def run(self, items: Sequence[float]) -> list[Features]:
        return [Features(self.modality, stats={"pressure_kpa": k}, vocabulary=self.vocabulary) for k in items]


def make_barometer(params: PassthroughParams, modality: Modality, device: str, dtype: str) -> Barometer:
    return Barometer(modality)


@pytest.fixture
def barometer(monkeypatch: pytest.MonkeyPatch) -> str:
    spec = registry.ProcessorSpec(
        "test-barometer", None, PassthroughParams, "tests.test_vocabulary:make_barometer"
    )
    monkeypatch.setitem(registry.REGISTRY, spec.name, spec)
    return spec.name


def slot(eid: str, f: Features, ts: int = 0) -> _Slot:
    return _Slot(eid, f.modality, ts, ts, features=f, arrived=ts, done=ts)


def frame(i: int, mods: dict[Modality, ModalityFusion], source: str = "s") -> FusedFrame:
    return FusedFrame(source, i * S, (i + 1) * S, mods, (), None, 0, 0)


def baro(kpa: float) -> Features:
    return Features("text", stats={"pressure_kpa": kpa}, vocabulary=PRESSURE)


def test_a_new_feature_fuses_reads_and_moves_the_trigger_in_process() -> None:
    fused = fuse_modality([slot("a", baro(101.3)), slot("b", baro(108.0), 1)])
    assert fused.summary == {"count": 2, "pressure_kpa": 108.0, "pressure_span_kpa": 6.7}
    assert fused.vocabulary is PRESSURE
    assert prompt_values(frame(0, {"text": fused}))["text"] == "barometer peaks at 108.0 kPa (spread 6.7)"
    calm = fuse_modality([slot("c", baro(101.3))])
    assert change_score(snapshot(frame(0, {"text": calm})), frame(1, {"text": fused})) == 1.0
    assert change_score(snapshot(frame(0, {"text": calm})), frame(1, {"text": calm})) == 0.0
    # The default reading would have said: a mean, and no change at all.
    plain = fuse_modality([slot("a", Features("text", stats={"pressure_kpa": 101.3})),
                           slot("b", Features("text", stats={"pressure_kpa": 108.0}), 1)])  # fmt: skip
    assert plain.summary == {"count": 2, "pressure_kpa": 104.65}
    assert plain.vocabulary is DEFAULT_VOCABULARY
    assert change_score(snapshot(frame(0, {"text": calm})), frame(1, {"text": plain})) == 0.0


async def test_a_registered_processor_brings_its_feature_end_to_end(
    nc: Any, nats_url: str, prefix: str, barometer: str
) -> None:
    out = await collect(nc, f"{prefix}.out.>")
    async with ChatServer() as srv:
        cfg = make_config(
            prefix,
            routes=[{"modality": "text", "processor": barometer, "batch": {"max_batch_size": 1}}],
            glm={"backend": "openai", "base_url": srv.url, "model": "m", "retries": 0,
                 "trigger": "on_change", "change_threshold": 0.3, "template": "{source}: {text}"},
        )  # fmt: skip
        engine = Engine(cfg)
        await engine.start(nats_url)
        t = (time.time_ns() // S - 5) * S  # a whole second in the recent past: windows of 100 ms
        plan = [(10, b"101.3"), (110, b"101.4"), (210, b"101.3"), (250, b"108.0")]
        for i, (off, body) in enumerate(plan):
            await send(nc, prefix, "roof", "text", body, t + off * MS, event_id=f"p{i}")
        await nc.flush()
        results = await out.wait_for(3)
        await engine.stop()
    by_window = {(r["window"]["start_ns"] - t) // (100 * MS): r for r in results}
    assert by_window[0]["features"]["text"] == {"count": 1, "pressure_kpa": 101.3, "pressure_span_kpa": 0.0}
    assert by_window[2]["features"]["text"] == {"count": 2, "pressure_kpa": 108.0, "pressure_span_kpa": 6.7}
    assert by_window[1]["glm"] == {"backend": "openai", "skipped": "no_change", "score": 0.02}
    assert by_window[2]["prompt"] == "roof: barometer peaks at 108.0 kPa (spread 6.7)"
    assert by_window[2]["answer"].startswith("seen: roof: barometer peaks at 108.0")
    assert len(srv.requests) == 2  # windows 0 and 2


# -- the built-in vocabularies -----------------------------------------------------------------


def everything(vocab: Vocabulary, seed: int = 3) -> Features:
    rng = np.random.default_rng(seed)
    return Features(
        "audio",
        embedding=rng.normal(size=8).astype(np.float32),
        frames=rng.normal(size=(13, 5)).astype(np.float32),
        stats={"loudness_dbfs": -12.345678, "voice_ratio": 0.5, "faces": 2.0, "hue_red": 0.25},
        text="words",
        labels=("a", "b", "a"),
        attachment=b"jpeg",
        vocabulary=vocab,
    )


@pytest.mark.parametrize("vocab", [DEFAULT_VOCABULARY, IMAGE, AUDIO, TEXT], ids=lambda v: type(v).__name__)
def test_each_vocabulary_fuses_one_event_the_short_way_exactly_like_the_general_way(
    vocab: FeatureVocabulary,
) -> None:
    f = everything(vocab)
    one, many = vocab._fuse_one(f), vocab._fuse_many([f])
    assert list(one.summary.items()) == list(many.summary.items())  # the order is published too
    assert one.embedding is not None and many.embedding is not None
    assert np.array_equal(one.embedding, many.embedding) and one.attachment == many.attachment
    core_one, core_many = _fuse_one(slot("e", f)), _fuse_many([slot("e", f)])
    assert list(core_one.summary.items()) == list(core_many.summary.items())
    assert core_one.vocabulary is core_many.vocabulary is vocab


def test_the_audio_vocabulary_names_its_frames_and_the_image_one_hides_the_hues() -> None:
    audio = fuse_modality([slot("a", everything(AUDIO))])
    assert "mfcc_mean" in audio.summary and "frames_mean" not in audio.summary
    plain = fuse_modality([slot("a", everything(DEFAULT_VOCABULARY))])
    assert "frames_mean" in plain.summary and "mfcc_mean" not in plain.summary
    image = fuse_modality([slot("i", replace(everything(IMAGE), text=None))])  # text would be all it says
    words = prompt_values(frame(0, {"image": image}))
    said = str(words["image"])
    assert "hue" not in said and "Faces: 2." in said  # words: the numbers stay in the summary
    assert "hue_red" in DEFAULT_VOCABULARY.describe(ModalityFusion((), (), {"count": 1, "hue_red": 0.5}))


def test_events_of_two_processors_in_one_window_are_fused_by_the_default_vocabulary() -> None:
    """A hot reload swapped the processor inside a window: no vocabulary reads another's features."""
    a = Aligner(AlignerConfig(window_ms=100, allowed_lateness_ms=0, idle_timeout_ms=1000), lambda: 0)
    for i, f in enumerate([everything(AUDIO), everything(DEFAULT_VOCABULARY, 4)]):
        ev = InputEvent("autoglm.in.s.audio", "s", "audio", i * MS, None, b"", f"e{i}")  # type: ignore[arg-type]
        a.admit(ev)
        a.complete("s", f"e{i}", f)
    [fr] = a.flush()
    fused = fr.modalities["audio"]
    assert fused.vocabulary is DEFAULT_VOCABULARY and "frames_mean" in fused.summary
    # Another instance of the same reading (a reloaded route may build its own) is the same.
    same = fuse_modality([slot("a", everything(AudioVocabulary())), slot("b", everything(AUDIO), 1)])
    assert same.vocabulary == AUDIO and "mfcc_mean" in same.summary


def test_a_processor_swap_reads_as_one_modality_leaving_and_another_arriving() -> None:
    emb = np.array([1.0, 0.0], np.float32)
    cnn = ModalityFusion(("i",), (0,), {"count": 1, "faces": 1.0}, emb, vocabulary=IMAGE)
    bare = ModalityFusion(("i",), (0,), {"count": 1, "bytes": 9.0})
    # The embedding went away: as if the image were gone, a whole change.
    assert change_score(snapshot(frame(0, {"image": cnn})), frame(1, {"image": bare})) == 1.0
    mfcc = ModalityFusion(("a",), (0,), {"count": 1, "loudness_dbfs": -20.0}, vocabulary=AUDIO)
    counted = ModalityFusion(("a",), (0,), {"count": 1, "bytes": 9.0})
    assert change_score(snapshot(frame(0, {"audio": mfcc})), frame(1, {"audio": counted})) == 0.0


def test_a_vocabulary_score_is_clipped_to_one_and_the_trigger_is_bounded() -> None:
    class Loud(FeatureVocabulary):
        def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
            return 7.0

    loud = ModalityFusion(("a",), (0,), {"count": 1}, vocabulary=Loud())
    assert change_score(snapshot(frame(0, {"audio": loud})), frame(1, {"audio": loud})) == 1.0
    trigger = ChangeTrigger(threshold=0.3, max_interval_ns=10 * S, max_sources=3)
    quiet: dict[Modality, ModalityFusion] = {
        "audio": ModalityFusion(("a",), (0,), {"count": 1, "loudness_dbfs": -20.0}, vocabulary=AUDIO)
    }
    for i in range(5):
        assert trigger.decide(frame(0, quiet, source=f"s{i}")).send  # first of each source
    assert len(trigger) == 3
    verdict = trigger.decide(frame(1, quiet, source="s4"))
    assert (verdict.send, verdict.why, verdict.score) == (False, "no_change", 0.0)
    assert trigger.decide(frame(10, quiet, source="s4")).send  # max_interval passed since frame 0


def test_the_core_names_no_feature_of_a_built_in_processor() -> None:
    """Whatever the built-in processors call their features lives in processors/, not engine/."""
    names = {"mfcc_mean", "mfcc_std", "faces", "loudness_dbfs", "voice_ratio", "centroid_hz", "brightness",
             "motion", "hue_red", "hue_green", "hue_cyan", "hue_blue", "chars", "tokens"}  # fmt: skip
    found = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, found
