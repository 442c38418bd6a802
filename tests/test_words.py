"""Words for the GLM: voice activity and speech to text, offline, and the words
of every processor reaching the prompt through the engine (OCR and object labels
on their own: tests/test_sight.py).

The speech is tests/data/speech.wav (espeak-ng, see tests/data/README.md):
"please open the window", a pause, "one two three four five". pocketsphinx
is not perfect, so the tests look for a few distinctive words it does hear.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import soundfile

from engine.config.models import parse_config
from engine.contracts.errors import ConfigError
from engine.contracts.types import ContentType, Features, InputEvent
from engine.glm.prompts import prompt_values
from engine.runtime.build import build_route
from engine.runtime.engine import Engine
from processors.registry import lookup
from tests.conftest import collect, make_config, send

SPEECH = Path(__file__).parent / "data" / "speech.wav"
PCM = "audio/pcm;rate=16000;channels=1;format=s16le"
CHUNK = 1600  # 100 ms at 16 kHz
T0 = 1_700_000_000_000_000_000
MS = 1_000_000


def clip() -> np.ndarray:
    samples, rate = soundfile.read(SPEECH, dtype="int16")
    assert rate == 16_000
    return np.asarray(samples)


def chunks(samples: np.ndarray, source: str = "mic") -> list[InputEvent]:
    ct = ContentType("audio/pcm", {"rate": "16000", "channels": "1", "format": "s16le"})
    return [
        InputEvent(
            f"autoglm.in.{source}.audio", source, "audio", T0 + i * 62_500, ct, body.tobytes(), f"a{i}"
        )
        for i in range(0, len(samples), CHUNK)
        if len(body := samples[i : i + CHUNK]) == CHUNK
    ]


def frame(*lines: str, size: tuple[int, int] = (640, 480)) -> bytes:
    """A JPEG with ``lines`` drawn large, white on dark grey."""
    img = np.full((size[1], size[0], 3), 40, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(img, line, (40, 120 + 130 * i), cv2.FONT_HERSHEY_SIMPLEX, 2.2, (255, 255, 255), 5)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def image_event(body: bytes, ts: int, eid: str, source: str = "cam") -> InputEvent:
    return InputEvent(f"autoglm.in.{source}.image", source, "image", ts, ContentType("image/jpeg"), body, eid)


def run_each(proc: Any, events: list[InputEvent]) -> list[Features]:
    """Chunk by chunk, as a stream arrives (the processor keeps per-source state)."""
    return [f for ev in events for f in proc.run([proc.prepare(ev)])]


def test_vad_marks_speech_and_silence() -> None:
    vad = lookup("vad").create({}, "audio", "cpu")
    feats = run_each(vad, chunks(clip()))
    speech = [f.stats["speech"] for f in feats]
    assert speech[:5] == [0.0] * 5  # the leading 0.6 s of silence
    assert sum(speech[8:20]) >= 10  # "please open the window" (0.6 s .. 2.2 s)
    assert speech[-3:] == [0.0] * 3  # the trailing silence
    assert 0 < sum(speech) < len(speech)
    assert all(0.0 <= f.stats["speech_prob"] <= 1.0 for f in feats)


def test_asr_transcribes_each_utterance_with_its_times() -> None:
    asr = lookup("asr").create({}, "audio", "cpu")
    feats = run_each(asr, chunks(clip()))
    said = [(i, f) for i, f in enumerate(feats) if f.text]
    assert len(said) == 2, [f.text for _, f in said]  # one per utterance, on the chunk after its pause
    (i1, first), (i2, second) = said
    assert "window" in str(first.text)
    assert {"three", "four", "five"} <= set(str(second.text).split())
    s1, e1 = first.stats["heard_start_ms"], first.stats["heard_end_ms"]
    s2, e2 = second.stats["heard_start_ms"], second.stats["heard_end_ms"]
    t0_ms = T0 / MS
    assert t0_ms + 500 <= s1 < t0_ms + 800 < e1 <= t0_ms + 2400  # speech from 0.6 s to 2.2 s
    assert e1 < s2 < e2 <= t0_ms + 5000
    assert T0 / MS + i1 * 100 >= e1 and T0 / MS + i2 * 100 >= e2  # said once the words were over


def test_asr_cuts_at_max_utterance_ms() -> None:
    asr = lookup("asr").create({"max_utterance_ms": 1000}, "audio", "cpu")
    feats = run_each(asr, chunks(clip()))
    spans = [(f.stats["heard_start_ms"], f.stats["heard_end_ms"]) for f in feats if f.text]
    assert len(spans) >= 3 and all(e - s <= 1100 for s, e in spans)


def test_a_route_runs_several_processors_and_their_words_fuse() -> None:
    config = make_config(
        "w",
        routes=[
            {
                "modality": "audio",
                "processor": "mfcc",
                "also": [{"processor": "vad"}, {"processor": "asr", "params": {"pause_ms": 300}}],
            }
        ],
    )
    route = build_route(config.routes[0], "routes[0]")
    feats = run_each(route.processor, chunks(clip()))
    f = next(f for f in feats if f.text or any(p.text for p in f.parts))
    assert [type(p.vocabulary).__name__ for p in f.parts] == [
        "AudioVocabulary",
        "VADVocabulary",
        "ASRVocabulary",
    ]
    assert f.frames is not None and {"loudness_dbfs", "speech_prob", "heard_start_ms"} <= set(f.stats)
    fused = f.vocabulary.fuse(feats[:24])  # type: ignore[union-attr]
    assert {"mfcc_mean", "loudness_dbfs", "speech", "heard", "heard_start_ms"} <= set(fused.summary)


def test_also_processors_are_checked_like_the_route_one() -> None:
    with pytest.raises(ConfigError) as err:
        make_config(
            "w",
            routes=[
                {
                    "modality": "audio",
                    "processor": "mfcc",
                    "also": [
                        {"processor": "nope"},
                        {"processor": "ocr"},
                        {"processor": "asr", "params": {"x": 1}},
                    ],
                }
            ],
        )
    text = str(err.value)
    assert "routes[0].also[0].processor" in text and "unknown processor" in text
    assert "routes[0].also[1].processor" in text and "handles image, not audio" in text
    assert "routes[0].also[2].params.x" in text


async def test_speech_and_text_reach_the_glm_through_the_engine(nc: Any, nats_url: str, prefix: str) -> None:
    """Real speech and a frame with text through a real nats-server and an
    OpenAI-compatible endpoint: the results carry the transcript and the text,
    and the model is asked in words."""
    from tests.chat_server import ChatServer

    out = await collect(nc, f"{prefix}.out.>")
    async with ChatServer(lambda n, body: ("ok", f"answer-{n}")) as srv:
        config = parse_config(
            {
                "nats": {"subject_prefix": prefix, "durable": False},
                "routes": [
                    {"modality": "image", "processor": "cnn", "also": [{"processor": "ocr"}]},
                    {
                        "modality": "audio",
                        "processor": "mfcc",
                        "also": [{"processor": "vad"}, {"processor": "asr"}],
                    },
                ],
                "aligner": {"window_ms": 1000, "allowed_lateness_ms": 0, "idle_timeout_ms": 500},
                "glm": {"backend": "openai", "base_url": srv.url, "model": "m", "retries": 0},
            },
            env={},
        )
        engine = Engine(config)
        await engine.start(nats_url)
        base = (time.time_ns() // 1_000_000_000 - 10) * 1_000_000_000  # window-aligned, in the past
        samples = clip()
        for i in range(0, len(samples) - CHUNK + 1, CHUNK):
            await send(nc, prefix, "lobby", "audio", samples[i : i + CHUNK].tobytes(), base + i * 62_500, PCM)
            if i == 15 * CHUNK:  # in time order: a later one would be too late with no allowed lateness
                await send(nc, prefix, "lobby", "image", frame("EXIT 3"), base + 1550 * MS)
        await nc.flush()

        def heard() -> list[str]:
            return [t for _, _, r in out.items for t in r["features"].get("audio", {}).get("heard", [])]

        await out.wait_until(lambda: len(heard()) >= 2, "two transcripts", timeout=30)
        await engine.stop()
    words = set(" ".join(heard()).split())
    assert "window" in words and {"three", "four", "five"} <= words
    results = [r for _, _, r in out.items]
    with_text = [r for r in results if r["features"].get("image", {}).get("seen")]
    assert [r["features"]["image"]["seen"] for r in with_text] == [["EXIT 3"]]
    assert 'Text seen: "EXIT 3".' in with_text[0]["prompt"]
    spoken = [r for r in results if r["features"].get("audio", {}).get("heard")]
    for r in spoken:  # the words' times are inside or before their window, and said in the prompt
        start, end = r["window"]["start_ns"] / MS, r["window"]["end_ns"] / MS
        assert all(e <= end for e in r["features"]["audio"]["heard_end_ms"])
        assert "Heard (" in r["prompt"] and "mfcc_mean" not in r["prompt"]
        assert all(s >= start - 15_000 for s in r["features"]["audio"]["heard_start_ms"])
        assert r["answer"].startswith("answer-")
    asked = [str(b["messages"][-1]["content"]) for b in srv.requests]
    assert any("Heard (" in p and "window" in p for p in asked)  # the model was given the words
    assert any('Text seen: "EXIT 3".' in p for p in asked)


def test_the_words_read_as_a_scene() -> None:
    from engine.align.aligner import fuse_modality
    from tests.test_vocabulary import frame as fused_frame
    from tests.test_vocabulary import slot

    asr = lookup("asr").create({}, "audio", "cpu")
    feats = run_each(asr, chunks(clip()))
    window = T0 + 2000 * MS  # the first transcript is said in the window from 2 s
    idx = next(i for i, f in enumerate(feats) if f.text)
    fused = fuse_modality([slot(f"a{idx}", feats[idx], idx)], window)
    words = str(prompt_values(fused_frame(0, {"audio": fused}))["audio"])
    assert words.startswith("Heard (-1.") and "s): " in words and "window" in words


def tiny_whisper(path: Path) -> Path:
    """A random Whisper built from its config, with a byte-level tokenizer of
    its own (the GLM tests do the same for GLM): shapes and paths, not words."""
    import json

    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]  # GPT-2's byte map
    special = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    vocab = {c: i for i, c in enumerate([*chars, *special])}
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    eot = "<|endoftext|>"
    tok = WhisperTokenizer(
        str(path / "vocab.json"),
        str(path / "merges.txt"),
        unk_token=eot,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        additional_special_tokens=special[1:],
    )
    cfg = WhisperConfig(
        vocab_size=len(vocab),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=32,
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    WhisperForConditionalGeneration(cfg).save_pretrained(path)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tok).save_pretrained(path)
    return path


def test_the_whisper_backend_transcribes_utterances_from_a_local_checkpoint(tmp_path: Path) -> None:
    model = tiny_whisper(tmp_path / "whisper")
    asr = lookup("asr").create({"backend": "whisper", "model": str(model)}, "audio", "cpu")
    feats = run_each(asr, chunks(clip()))
    said = [f for f in feats if f.text]
    assert len(said) == 2  # random weights say nothing sensible, but once per utterance
    assert all("<|" not in str(f.text) for f in said)  # special tokens are not words
    ends = [f.stats["heard_end_ms"] for f in said]
    assert ends[0] < ends[1] <= T0 / MS + 5000
    with pytest.raises(ConfigError, match="no Whisper in that directory"):
        lookup("asr").create({"backend": "whisper", "model": str(tmp_path)}, "audio", "cpu")
    with pytest.raises(ConfigError, match=r"needs params\.model"):
        lookup("asr").create({"backend": "whisper"}, "audio", "cpu")


def test_on_change_fires_on_a_new_transcript_or_new_text_seen() -> None:
    from engine.contracts.types import FusedFrame, ModalityFusion
    from engine.contracts.vocabulary import Ensemble
    from engine.glm.trigger import ChangeTrigger
    from processors.vocabulary import ASR, AUDIO, IMAGE, OCR, VAD

    ears, eyes = Ensemble((AUDIO, VAD, ASR)), Ensemble((IMAGE, OCR))
    emb = np.array([1.0, 0.0], np.float32)

    def frame(i: int, heard: list[str], seen: list[str], speech: float = 0.5) -> FusedFrame:
        audio: dict[str, object] = {"count": 10, "loudness_dbfs": -30.0, "speech": speech}
        image: dict[str, object] = {"count": 30, "faces": 1.0}
        if heard:
            audio.update(heard=heard, heard_start_ms=[i * 1000.0], heard_end_ms=[i * 1000.0 + 500])
        if seen:
            image["seen"] = seen
        mods = {
            "audio": ModalityFusion((), (), audio, vocabulary=ears),
            "image": ModalityFusion((), (), image, emb, vocabulary=eyes),
        }
        return FusedFrame("s", i * 10**9, (i + 1) * 10**9, mods, (), None, 0, 0)  # type: ignore[arg-type]

    trigger = ChangeTrigger(0.3, 10**12)
    sent = [
        trigger.decide(f).send
        for f in [
            frame(0, [], []),
            frame(1, [], []),  # the same scene
            frame(2, ["open the window"], []),  # words heard
            frame(3, ["open the window"], []),  # the same words again
            frame(4, [], ["EXIT 3"]),  # a sign comes into view
            frame(5, [], ["EXIT 3"]),
            frame(6, [], ["EXIT 3"], speech=1.0),  # speech starts: a step of half the window
        ]
    ]
    assert sent == [True, False, True, False, True, False, True]


def test_a_dead_pocketsphinx_child_is_started_again() -> None:
    """The decoder runs in a child process (it holds the GIL): one that died is replaced."""
    from processors.sphinx import Pocketsphinx

    sphinx = Pocketsphinx()
    first = sphinx._child
    assert first is not None
    first.kill()
    first.wait()
    window = clip()[9_600:36_000].astype(np.float32) / 32768  # "please open the window"
    [words] = sphinx.transcribe([window])
    assert "window" in words and sphinx._child is not first
    sphinx.close()
    assert sphinx._child is not None and sphinx._child.poll() is not None  # closed with it


def test_a_chunk_too_short_for_a_frame_reads_as_the_last_frame() -> None:
    """Silero reads 32 ms frames: a 10 ms chunk completes none, and takes the last one's word."""
    vad = lookup("vad").create({}, "audio", "cpu")
    samples = clip()
    speech = chunks(samples[16_000:19_200])  # 0.2 s inside "please open the window"
    ct = speech[0].content_type
    tiny = InputEvent(
        "autoglm.in.mic.audio", "mic", "audio", T0 + 10**9, ct, samples[19_200:19_360].tobytes(), "t"
    )
    feats = run_each(vad, [*speech, tiny])
    assert feats[-1].stats["speech"] == feats[-2].stats["speech"] == 1.0
