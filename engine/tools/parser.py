"""``autoglm``'s arguments: every command, its flags, their help."""

from __future__ import annotations

import argparse
from typing import NoReturn

from engine.config.models import NATS_URL_ENV
from engine.tools.argtypes import (
    CNNS,
    PORT,
    connection_options,
    input_file,
    int_in,
    media_url,
    not_negative,
    positive,
    prefix,
    since,
    since_or_start,
    source,
    speed,
)
from engine.tools.options import DEFAULT_CONFIG


class Parser(argparse.ArgumentParser):
    """Argument errors as one line, ``autoglm <command>: <what is wrong>``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="autoglm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one object per line")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the engine until SIGINT/SIGTERM, then drain")
    run.add_argument("--config", help=f"routing file (default ./{DEFAULT_CONFIG})")
    run.add_argument("--nats-url", help=f"use this server instead of the embedded one (or {NATS_URL_ENV})")
    run.add_argument(
        "--secure",
        action="store_true",
        help="embedded server with generated users (producer, engine, reader); anonymous refused",
    )
    run.add_argument("--trace-file", help="append OpenTelemetry spans to this file as JSON lines")
    run.add_argument(
        "--workers",
        type=int_in(1, 256),
        default=1,
        help="start K worker processes of this config, kept up by this one; the partitions spread "
        "over them (K > 1 needs JetStream; see docs/scaling.md)",
    )
    run.add_argument(
        "--metrics-port", type=PORT, help="serve Prometheus /metrics on this port (worker i: PORT+i-1)"
    )

    pub = sub.add_parser(
        "publish",
        help="publish an image or a text, or stream a video, audio or text source (docs/sources.md)",
    )
    pub.add_argument("--source", required=True, type=source, help="source name, 1-64 of [A-Za-z0-9_-]")
    what = pub.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", type=input_file, help="a JPEG or PNG file")
    what.add_argument("--text", help="a UTF-8 string; - reads standard input, one event per line")
    what.add_argument(
        "--video",
        metavar="URL",
        type=media_url,
        help="a video file or stream FFmpeg opens (rtsp://, udp://...), or a camera (/dev/video0, 0)",
    )
    what.add_argument(
        "--audio", metavar="URL", type=media_url, help="an audio file or stream FFmpeg opens, as PCM chunks"
    )
    what.add_argument("--text-file", metavar="PATH", type=input_file, help="a text file, one event per line")
    connection_options(pub, "server to publish to")
    pub.add_argument("--config", help="read nats.url and the subject prefix from this file")
    pub.add_argument("--prefix", type=prefix, help="subject prefix (default: --config's, else autoglm)")
    pub.add_argument(
        "--chunk-ms", type=int_in(1, 3_600_000), default=100, help="audio chunk length (default 100)"
    )
    pub.add_argument("--id", help="Nats-Msg-Id for the event (streams: a prefix for each event's id)")
    pub.add_argument(
        "--wait", type=not_negative, default=0.0, help="wait up to N s for the result or DLQ record"
    )
    pub.add_argument(
        "--claim-check",
        action="store_true",
        help="send the bytes through the Object Store even when they fit (automatic above max_payload)",
    )
    media = pub.add_argument_group("streams (--video, --audio, --text-file, --text -)")
    media.add_argument("--with-audio", action="store_true", help="--video: send its audio track too")
    media.add_argument("--fps", type=positive, help="at most N frames a second (default: the stream's rate)")
    media.add_argument("--quality", type=int_in(1, 100), default=90, help="JPEG quality (default 90)")
    media.add_argument("--raw", action="store_true", help="frames as raw BGR instead of JPEG")
    media.add_argument("--loop", action="store_true", help="a file: start again at its end, until Ctrl-C")
    pace = media.add_mutually_exclusive_group()
    pace.add_argument(
        "--realtime", action="store_true", help="a file: at its own rate (the default), dropping when slower"
    )
    pace.add_argument(
        "--as-fast-as-possible",
        action="store_true",
        help="a file: without pacing or dropping; timestamps still follow the file's",
    )
    media.add_argument(
        "--timeout",
        type=positive,
        default=10.0,
        help="seconds to open a stream and for each read (default 10)",
    )
    media.add_argument("--input-format", help="FFmpeg's input format (-f): alsa, mjpeg, mpegts...")
    media.add_argument("--follow", action="store_true", help="--text-file: keep reading what is appended")
    pub.add_argument("--traceparent", help="W3C trace context to continue (default: a new trace)")

    tl = sub.add_parser("tail", help="print results (and with --dlq rejections) as they arrive")
    tl.add_argument("--source", action="append", type=source, help="only this source (repeat for more)")
    tl.add_argument("--dlq", action="store_true", help="rejections (DLQ and late records) too")
    tl.add_argument("--json", action="store_true", help="each record as published, one JSON object a line")
    connection_options(tl, "server to read from")
    tl.add_argument("--config", help="read nats.url and the subject prefix from this file")
    tl.add_argument("--prefix", type=prefix, help="subject prefix (default: --config's, else autoglm)")
    tl.add_argument(
        "--durable", type=source, help="read the results stream through this named consumer (resumes)"
    )
    tl.add_argument("--from-start", action="store_true", help="read the results stream from its start")
    tl.add_argument(
        "--since",
        type=since_or_start,
        help="read the results stream from: a duration ago (15m), an ISO time, or all",
    )
    tl.add_argument("--count", type=int_in(1, 2**31), help="exit after N records")

    st = sub.add_parser("status", help="a live table of the engines found through NATS discovery")
    connection_options(st, "server to look on")
    st.add_argument("--once", action="store_true", help="print the table once and exit")
    st.add_argument("--info", action="store_true", help="print each engine's $SRV.INFO reply (JSON) and exit")
    st.add_argument("--interval", type=positive, default=2.0, help="seconds between refreshes")

    rl = sub.add_parser("reload", help="every engine found re-reads its routing file (like SIGHUP)")
    connection_options(rl, "server to look on")
    rl.add_argument("--prefix", help="only the engines of this subject prefix")
    rl.add_argument("--timeout", type=positive, default=60.0, help="seconds to wait for each engine")

    rp = sub.add_parser("replay", help="re-feed the recorded input stream through a fresh aligner")
    rp.add_argument(
        "--since", required=True, type=since, help="all, a duration ago (15m, 2h), or an ISO time with zone"
    )
    rp.add_argument("--speed", type=speed, default=None, help="X times the recorded pace, or max (default)")
    rp.add_argument("--out", help="write the JSON lines here (default stdout)")
    rp.add_argument("--config", help=f"routing file (default ./{DEFAULT_CONFIG} or built-in)")
    connection_options(rp, "server holding the recording")

    hl = sub.add_parser("health", help="exit 0 if an engine answers its health endpoint")
    hl.add_argument("--config", help=f"routing file (default ./{DEFAULT_CONFIG} or built-in)")
    connection_options(hl, "server to ask")
    hl.add_argument("--timeout", type=positive, default=3.0, help="seconds (default 3)")

    mon = sub.add_parser("monitor", help="a live page of the engines, sources and rejections (read-only)")
    connection_options(mon, "server to watch")
    mon.add_argument("--config", help="read nats settings and the subject prefix from this file")
    mon.add_argument("--prefix", type=prefix, help="subject prefix (default: --config's, else autoglm)")
    mon.add_argument("--host", default="127.0.0.1", help="address to serve on (default loopback only)")
    mon.add_argument("--port", type=PORT, default=8765, help="port to serve on (0: any free one)")
    mon.add_argument(
        "--secure",
        action="store_true",
        help="connect as the reader that `run --secure` wrote (no input frames: it may not read inputs)",
    )

    val = sub.add_parser("validate", help="check a routing file; exit 2 with each problem")
    val.add_argument("file", nargs="?", help=f"default ./{DEFAULT_CONFIG}")

    sub.add_parser("plugins", help="list every processor (package, version, modalities, origin)")

    md = sub.add_parser("models", help="the models each engine's routes have loaded, with their versions")
    connection_options(md, "server to look on")

    ab = sub.add_parser("ab", help="A/B variants: `autoglm ab report`")
    ab_sub = ab.add_subparsers(dest="ab_command", required=True)
    abr = ab_sub.add_parser("report", help="per route and variant, from the results stream")
    abr.add_argument(
        "--since", type=since, default=None, help="all (default), a duration ago (15m), an ISO time"
    )
    abr.add_argument(
        "--config", help=f"routing file: prefix and stream (default ./{DEFAULT_CONFIG} or built-in)"
    )
    connection_options(abr, "server holding the results")

    ex = sub.add_parser("export", help="a route's model as ONNX (optionally int8), checked against torch")
    ex.add_argument(
        "--route", default="image", help="image (the cnn route) or text (the minilm route); default image"
    )
    ex.add_argument("--config", help=f"routing file (default ./{DEFAULT_CONFIG} or built-in)")
    ex.add_argument("--out", default="models", help="directory to write into (default models/)")
    ex.add_argument(
        "--int8",
        nargs="?",
        const="static",
        choices=["static", "dynamic"],
        default=None,
        help="also write an int8 copy: static (calibrated; default) or dynamic",
    )
    ex.add_argument("--calibrate", help="directory of JPEG/PNG frames to check and calibrate on")
    ex.add_argument("--min-cosine", type=float, default=0.99, help="fp32 threshold (default 0.99)")
    ex.add_argument("--min-cosine-int8", type=float, default=0.97, help="int8 threshold (default 0.97)")
    ex.add_argument("--samples", type=int_in(2, 4096), default=32, help="frames to compare on (default 32)")

    di = sub.add_parser("distill", help="train a small student CNN to match a teacher on your frames")
    di.add_argument("--teacher", default="resnet50", choices=list(CNNS))
    di.add_argument("--student", default="mobilenet_v3_small", choices=list(CNNS))
    di.add_argument("--frames", required=True, help="directory of JPEG/PNG frames (a fifth held out)")
    di.add_argument("--epochs", type=int_in(1, 10_000), default=5)
    di.add_argument("--out", default="models", help="directory to write into (default models/)")
    di.add_argument("--teacher-weights", choices=["random", "imagenet"], default="imagenet")
    di.add_argument("--teacher-weights-path", help="the teacher's torchvision checkpoint")
    di.add_argument("--alpha", type=float, default=0.5, help="weight of CE against KL (default 0.5)")
    di.add_argument("--temperature", type=positive, default=4.0, help="softening T (default 4)")
    di.add_argument("--input-size", type=int_in(32, 1024), default=224)
    di.add_argument("--resume", action="store_true", help="go on from the last finished epoch")

    demo = sub.add_parser("demo", help="embedded server + engine + a synthetic multimodal stream")
    demo.add_argument("--seconds", type=positive, default=10.0)
    demo.add_argument("--sources", type=int_in(1, 10_000), default=2)
    demo.add_argument("--config", help=f"routing file (default ./{DEFAULT_CONFIG} or built-in)")
    demo.add_argument("--nats-url", help="use this server instead of the embedded one")
    demo.add_argument("--metrics-port", type=PORT, help="serve Prometheus /metrics on this port (0: any)")
    demo.add_argument("--trace-file", help="append OpenTelemetry spans (producer and engine) as JSON lines")
    demo.add_argument("--width", type=int_in(16, 7680), default=320, help="frame width (default 320)")
    demo.add_argument("--height", type=int_in(16, 4320), default=240, help="frame height (default 240)")
    demo.add_argument(
        "--monitor",
        type=PORT,
        nargs="?",
        const=8765,
        metavar="PORT",
        help="serve the live page (autoglm monitor) beside the demo on this port (default 8765)",
    )
    return p
