"""Media sources: video and audio files made here with PyAV, a live MPEG-TS
stream on loopback, text files, and the one-line errors, published with
``autoglm publish`` to a real engine."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from fractions import Fraction
from itertools import pairwise
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile

from engine.contracts.errors import SourceError
from engine.runtime.engine import Engine
from engine.sources.camera import CameraReader, needs_opencv
from engine.sources.reader import MediaOptions, MediaReader
from engine.sources.text import TextReader
from tests.conftest import Collector, Transport, collect, eventually, make_config, round_trip
from tests.mediafiles import frame, make_video
from tests.test_cli import AUTOGLM, run_cli

SECOND = 1_000_000_000


def read_all(reader: MediaReader | TextReader, limit: int | None = None) -> list[Any]:
    stop = threading.Event()
    items = []
    for item in reader.items(stop):
        items.append(item)
        if limit is not None and len(items) >= limit:
            stop.set()
    return items


class Inputs(Collector):
    """Every event published for a source, as the engine receives it: headers, body bytes."""

    async def cb(self, msg: Any) -> None:
        self.items.append((msg.subject, dict(msg.headers or {}), msg.data))
        self._event.set()


async def inputs(nc: Any, prefix: str, source: str) -> Inputs:
    c = Inputs()
    await nc.subscribe(f"{prefix}.in.{source}.*", cb=c.cb)
    await round_trip(nc)
    return c


def stamps(events: Collector, modality: str) -> list[int]:
    return [int(h["AutoGLM-Timestamp"]) for s, h, _ in events.items if s.endswith(modality)]


async def test_every_frame_of_a_file_is_published_and_fused_with_the_files_spacing(
    nats_url: str, nc: Any, prefix: str, tmp_path: Path, transport: Transport
) -> None:
    video = make_video(tmp_path / "moving.mp4", frames=20, fps=10)
    seen = await inputs(nc, prefix, "cam")
    out = await collect(nc, f"{prefix}.out.cam")
    engine = Engine(transport.config(prefix))
    await engine.start(nats_url)
    try:
        code, printed, err = await run_cli(
            "publish", "--nats-url", nats_url, "--prefix", prefix, "--source", "cam",
            "--video", str(video), "--as-fast-as-possible", "--quality", "80",
        )  # fmt: skip
        assert code == 0, err
        assert f"published 20 image event(s) on {prefix}.in.cam.image (image/jpeg)" in printed
        assert "dropped 0" in printed
        ids = {h["Nats-Msg-Id"] for _, h, _ in seen.items}
        assert len(ids) == 20
        await out.wait_events(ids)  # every frame accounted for in a result
        assert sorted(out.event_ids()) == sorted(ids)
        ts = stamps(seen, "image")
        assert [b - a for a, b in pairwise(ts)] == [SECOND // 10] * 19  # the file's interval
        assert ts[-1] < time.time_ns()  # placed to end when publishing began: none in the future
    finally:
        await engine.stop()


def test_fps_keeps_every_other_frame_by_timestamp(tmp_path: Path) -> None:
    video = make_video(tmp_path / "v.mp4", frames=20, fps=10)
    reader = MediaReader(str(video), MediaOptions(fps=5, realtime=False))
    items = read_all(reader)
    assert len(items) == 10 and reader.picker.skipped == 10
    ts = [i.ts for i in items]
    assert {b - a for a, b in pairwise(ts)} == {SECOND // 5}


def test_a_looped_file_continues_its_timeline_pass_after_pass(tmp_path: Path) -> None:
    video = make_video(tmp_path / "short.mp4", frames=4, fps=20)
    reader = MediaReader(str(video), MediaOptions(loop=True))  # looping paces at the file's rate
    items = read_all(reader, limit=10)
    assert reader.passes == 3
    ts = [i.ts for i in items]
    assert [b - a for a, b in pairwise(ts)] == [SECOND // 20] * 9  # no jump at a pass
    with pytest.raises(SourceError, match="ahead of the clock"):
        MediaReader(str(video), MediaOptions(loop=True, realtime=False))


def test_a_files_audio_comes_in_chunks_aligned_with_its_frames(tmp_path: Path) -> None:
    video = make_video(tmp_path / "av.mp4", frames=20, fps=10, audio=True)
    items = read_all(MediaReader(str(video), MediaOptions(audio=True, chunk_ms=100, realtime=False)))
    frames = [i for i in items if i.modality == "image"]
    chunks = [i for i in items if i.modality == "audio"]
    assert len(frames) == 20
    assert chunks[0].content_type == "audio/pcm;rate=16000;channels=1;format=f32le"
    assert chunks[0].ts == frames[0].ts  # one timeline: the tracks start together
    full = [c for c in chunks if len(c.body) == 1600 * 4]  # 100 ms at 16 kHz, float32
    assert len(full) >= 19 and chunks.index(full[-1]) == len(full) - 1  # only the last one is shorter
    ts = [c.ts for c in chunks]
    assert {b - a for a, b in pairwise(ts)} == {SECOND // 10}
    assert sum(len(c.body) for c in chunks) // 4 >= 2 * 16_000  # the whole track (AAC may pad)


async def test_with_audio_fills_windows_with_both_tracks(
    nats_url: str, nc: Any, prefix: str, tmp_path: Path
) -> None:
    video = make_video(tmp_path / "av.mp4", frames=10, fps=10, audio=True)
    out = await collect(nc, f"{prefix}.out.mic")
    engine = Engine(make_config(prefix, nats={"durable": False}))
    await engine.start(nats_url)
    try:
        code, printed, err = await run_cli(
            "publish", "--nats-url", nats_url, "--prefix", prefix, "--source", "mic",
            "--video", str(video), "--with-audio", "--as-fast-as-possible",
        )  # fmt: skip
        assert code == 0, err
        assert "published 10 image event(s)" in printed and "audio event(s)" in printed
        await out.wait_until(
            lambda: any({"image", "audio"} <= set(r["events"]) for _, _, r in out.items),
            "a window holding frames and audio chunks",
        )
    finally:
        await engine.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _write_mpegts(port: int, frames: int) -> None:
    with av.open(f"tcp://127.0.0.1:{port}", "w", format="mpegts") as out:
        video = out.add_stream("mpeg2video", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            vf = av.VideoFrame.from_ndarray(frame(i, 64, 48), format="bgr24")
            vf.pts, vf.time_base = i, Fraction(1, 10)
            for packet in video.encode(vf):
                out.mux(packet)  # the first one connects
        for packet in video.encode():
            out.mux(packet)


def _send_mpegts(port: int, frames: int, stop: threading.Event) -> None:
    """Connect to the publisher (listening) and send ``frames`` frames of MPEG-TS."""
    while not stop.is_set():
        try:
            _write_mpegts(port, frames)
            return
        except av.ConnectionRefusedError:  # not listening yet: the condition is polled
            stop.wait(0.05)


async def test_a_live_mpegts_stream_on_loopback_is_published_and_fused(
    nats_url: str, nc: Any, prefix: str
) -> None:
    port = _free_port()
    out = await collect(nc, f"{prefix}.out.net")
    dlq = await collect(nc, f"{prefix}.dlq.net")
    engine = Engine(make_config(prefix, nats={"durable": False}))
    await engine.start(nats_url)
    stop = threading.Event()
    sender = threading.Thread(target=_send_mpegts, args=(port, 30, stop), daemon=True)
    try:
        url = f"tcp://127.0.0.1:{port}?listen=1"  # the publisher listens; the stream connects to it
        args = ("--prefix", prefix, "--source", "net", "--video", url, "--timeout", "30")
        publish = asyncio.create_task(run_cli("publish", "--nats-url", nats_url, *args))
        sender.start()
        code, printed, err = await publish
        assert code == 0, err
        line = next(x for x in printed.splitlines() if x.startswith("published"))
        sent = int(line.split()[1])
        dropped = int(printed.split("dropped ")[1].split()[0])
        assert sent >= 1 and sent + dropped == 30  # a live stream drops what it cannot send, and says so
        await out.wait_until(
            lambda: len(out.event_ids()) == sent, f"results for all {sent} frames: {out.items} {dlq.items}"
        )
    finally:
        stop.set()
        await engine.stop()


def test_text_lines_one_event_each_and_follow_sees_appended_lines(tmp_path: Path) -> None:
    path = tmp_path / "captions.txt"
    path.write_bytes(b"a red ball\n\nrolls away\r\nlast")
    assert [i.body for i in read_all(TextReader(str(path)))] == [b"a red ball", b"rolls away", b"last"]

    path.write_bytes(b"first\n")
    reader = TextReader(str(path), follow=True)
    stop = threading.Event()
    got: list[bytes] = []

    def follow() -> None:
        for item in reader.items(stop):
            got.append(item.body)
            if len(got) == 1:
                with path.open("ab") as f:
                    f.write(b"second\n")
            if len(got) == 2:
                stop.set()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    thread.join(20)
    assert got == [b"first", b"second"]


async def test_text_from_stdin_and_a_text_file(nats_url: str, nc: Any, prefix: str, tmp_path: Path) -> None:
    seen = await inputs(nc, prefix, "txt")
    path = tmp_path / "lines.txt"
    path.write_text("one\ntwo\nthree\n")
    code, printed, err = await run_cli(
        "publish", "--nats-url", nats_url, "--prefix", prefix, "--source", "txt", "--text-file", str(path)
    )
    assert code == 0, err
    assert f"published 3 text event(s) on {prefix}.in.txt.text" in printed
    proc = await asyncio.create_subprocess_exec(
        *AUTOGLM,
        "publish", "--nats-url", nats_url, "--prefix", prefix, "--source", "txt", "--text", "-",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(b"four\nfive\n"), 60)
    assert proc.returncode == 0, stderr
    assert b"published 2 text event(s)" in stdout
    await seen.wait_for(5)
    assert [body for _, _, body in seen.items] == [b"one", b"two", b"three", b"four", b"five"]


def _unknown_codec(tmp_path: Path) -> Path:
    """A Matroska file whose video track names a codec no FFmpeg knows."""
    mkv = make_video(tmp_path / "h264.mkv", frames=3).read_bytes()
    assert mkv.count(b"V_MPEG4/ISO/") == 1  # AVC (H.264) or ASP (MPEG-4 Part 2)
    path = tmp_path / "unknown.mkv"
    path.write_bytes(mkv.replace(b"V_MPEG4/ISO/", b"V_QQQQQ/ISO/"))
    return path


@pytest.mark.parametrize(
    ("what", "code", "words"),
    [
        ("missing", 2, "no such file"),
        ("garbage", 1, "not a media file or stream FFmpeg can read"),
        ("unreachable", 1, "rtsp://127.0.0.1:1/x: cannot open: Connection refused"),
        ("no-video", 1, "has no video stream"),
        ("silent", 1, "nothing answered within 1 s"),
        ("codec", 1, "unsupported video codec (FFmpeg has no decoder for it)"),
    ],
)
async def test_bad_inputs_fail_with_one_clear_line(
    nats_url: str, prefix: str, tmp_path: Path, what: str, code: int, words: str
) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video\n" * 50)
    text_only = tmp_path / "audio.wav"
    soundfile.write(str(text_only), np.zeros(800, np.float32), 8000)  # audio, and no video
    url = {
        "missing": str(tmp_path / "nope.mp4"),
        "garbage": str(garbage),
        "unreachable": "rtsp://127.0.0.1:1/x",
        "no-video": str(text_only),
        "silent": f"udp://127.0.0.1:{_free_port()}",  # nobody sends there
        "codec": str(_unknown_codec(tmp_path)),
    }[what]
    got, printed, err = await run_cli(
        "publish", "--nats-url", nats_url, "--prefix", prefix, "--source", "bad",
        "--video", url, "--timeout", "1",
    )  # fmt: skip
    assert got == code, err + printed
    assert words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


async def test_flags_that_mean_nothing_for_the_input_are_refused(nats_url: str, tmp_path: Path) -> None:
    video = make_video(tmp_path / "v.mp4", frames=2)
    for flags, words in [
        (("--text", "hi", "--with-audio"), "--with-audio needs --video"),
        (("--video", str(video), "--wait", "3"), "autoglm tail"),
        (("--video", str(video), "--loop", "--as-fast-as-possible"), "ahead of the clock"),
    ]:
        code, _, err = await run_cli("publish", "--nats-url", nats_url, "--source", "f", *flags)
        assert code in (1, 2) and words in err and "Traceback" not in err, err


async def test_a_reader_stopped_early_lets_go_of_its_file(tmp_path: Path) -> None:
    video = make_video(tmp_path / "v.mp4", frames=10)
    items = read_all(MediaReader(str(video), MediaOptions(realtime=False)), limit=2)
    assert len(items) == 2
    with contextlib.suppress(FileNotFoundError):
        video.unlink()  # closed: nothing holds it (on every OS)
    await eventually(lambda: asyncio.sleep(0, result=not video.exists()), "the file to be gone")


async def test_ctrl_c_stops_a_looped_file_with_its_summary(
    nats_url: str, prefix: str, tmp_path: Path
) -> None:
    video = make_video(tmp_path / "v.mp4", frames=5, fps=10)
    proc = await asyncio.create_subprocess_exec(
        *AUTOGLM, "publish", "--nats-url", nats_url, "--prefix", prefix, "--source", "lp",
        "--video", str(video), "--loop",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    progress = await asyncio.wait_for(proc.stderr.readline(), 30)  # a second in: it is looping
    assert progress.startswith(b"autoglm publish: ") and b"image sent" in progress
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    sent = int(out.decode().split("published ")[1].split()[0])
    assert sent > 5  # past the end of the first pass


def test_cameras_go_through_opencv_where_the_wheels_ffmpeg_has_no_device_input() -> None:
    assert not needs_opencv("clip.mp4") and not needs_opencv("rtsp://cam/1")
    has_v4l2 = "v4l2" in av.formats_available
    assert needs_opencv("/dev/video0") is not has_v4l2 and needs_opencv("0") is not has_v4l2
    with pytest.raises(SourceError, match="no audio track"):
        CameraReader("0", MediaOptions(audio=True))


async def test_a_camera_that_is_not_there_is_one_clear_line(nats_url: str, prefix: str) -> None:
    code, _, err = await run_cli(
        "--log-level", "ERROR", "publish", "--nats-url", nats_url, "--prefix", prefix, "--source", "c",
        "--video", "63",
    )  # fmt: skip
    assert code == 1 and err == "autoglm publish: 63: cannot open the camera (OpenCV)\n"


async def test_ctrl_c_ends_text_from_a_quiet_stdin(nats_url: str, nc: Any, prefix: str) -> None:
    """The reader is blocked on a standard input that says nothing more: Ctrl-C still ends it."""
    seen = await inputs(nc, prefix, "quiet")
    proc = await asyncio.create_subprocess_exec(
        *AUTOGLM, "publish", "--nats-url", nats_url, "--prefix", prefix, "--source", "quiet", "--text", "-",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(b"one\ntwo\n")
    await proc.stdin.drain()
    await seen.wait_for(2, timeout=30)  # both published; stdin stays open
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert b"published 2 text event(s)" in out


def _pcm_frame(rate: int, n: int, value: float) -> Any:
    import av

    frame = av.AudioFrame.from_ndarray(np.full((1, n), value, np.float32), format="flt", layout="mono")
    frame.sample_rate = rate
    return frame


def test_audio_after_a_gap_is_stamped_at_its_own_time_not_the_sample_count() -> None:
    """A file with a hole, or a live stream that stalled: the chunks after it
    carry the time their frames came with, not the time the samples before
    them would have reached."""
    from engine.sources.audio import Chunker

    chunker = Chunker(100)
    out = []
    for k in range(30):  # 2.4 s at 16 kHz in 80 ms frames: samples wait in the buffer across the gap
        out += list(chunker.add(_pcm_frame(16_000, 1280, 0.1), k * 80_000_000))
    for k in range(10):  # 8 s later
        out += list(chunker.add(_pcm_frame(16_000, 1280, 0.1), 10_400_000_000 + k * 80_000_000))
    out += list(chunker.flush())
    stamps = [ts for ts, _, _ in out]
    assert stamps[:24] == [k * 100_000_000 for k in range(24)]  # the first run, to its last sample
    assert stamps[24:] == [10_400_000_000 + k * 100_000_000 for k in range(8)]


def test_a_change_of_sample_rate_ends_the_chunk_at_the_old_rate() -> None:
    from engine.sources.audio import Chunker

    chunker = Chunker(100)
    out = list(chunker.add(_pcm_frame(16_000, 1000, 0.1), 0))  # 62.5 ms: waits in the buffer
    out += list(chunker.add(_pcm_frame(48_000, 4800, 0.9), 62_500_000))
    first_ts, first_body, first_ct = out[0]
    assert first_ts == 0 and "rate=16000" in first_ct
    assert np.all(np.frombuffer(first_body, "<f4") == np.float32(0.1)) and len(first_body) == 4 * 1000
    rest = out[1:]
    assert rest and all("rate=48000" in ct for _, _, ct in rest) and rest[0][0] == 62_500_000


async def test_as_fast_as_possible_ends_now_even_when_the_container_does_not_say_its_length(
    tmp_path: Path,
) -> None:
    """A raw MPEG-4 elementary stream has no container duration: its length is
    read off its packets, so the file still ends now and no event is in the
    future (the engine refuses those past max_future_ms)."""
    from fractions import Fraction

    import av

    from engine.sources.pump import Pump
    from engine.sources.reader import MediaOptions, MediaReader
    from tests.mediafiles import frame

    path = tmp_path / "raw.m4v"
    with av.open(str(path), "w", format="m4v") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(100):  # 10 s
            vf = av.VideoFrame.from_ndarray(frame(i, 64, 48), format="bgr24")
            vf.pts, vf.time_base = i, Fraction(1, 10)
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(str(path)) as probe:
        assert probe.duration is None  # what this test is about
    reader = MediaReader(str(path), MediaOptions(realtime=False))
    items = [it async for it in Pump(reader.items, drop=False)]
    now = time.time_ns()
    assert len(items) == 100
    assert max(it.ts for it in items) <= now and now - min(it.ts for it in items) >= 9_000_000_000
