"""The commands that put events on the bus or read records off it: ``publish``, ``tail``."""

from __future__ import annotations

import argparse
from typing import Any

from engine.config.models import (
    NATS_URL_ENV,
    NatsConfig,
)
from engine.contracts.errors import ConfigError
from engine.tools.options import client_nats


def overrides_of(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Command-line values that win over the routing file, now and on every reload."""
    out: dict[str, dict[str, Any]] = {}
    if args.trace_file:
        out["tracing"] = {"file": args.trace_file}
    if getattr(args, "metrics_port", None) is not None:
        out["metrics"] = {"port": args.metrics_port}
    return out


async def cmd_publish(args: argparse.Namespace) -> int:
    from engine.tools.publish import publish_file
    from engine.transport.security import connect_kwargs

    nats = client_nats(args)
    if not nats.url:
        raise ConfigError([f"no NATS url: pass --nats-url or set {NATS_URL_ENV}"])
    streaming = args.video or args.audio or args.text_file or args.text == "-"
    check_stream_flags(args, bool(streaming))
    if streaming:
        return await publish_stream(args, nats)
    sent = await publish_file(
        nats.url,
        args.source,
        connect_opts=connect_kwargs(nats),
        claim_check=args.claim_check,
        bucket=nats.object_bucket,
        image=args.image,
        text=args.text,
        prefix=args.prefix or nats.subject_prefix,
        event_id=args.id,
        wait=args.wait,
        traceparent=args.traceparent,
    )
    return 0 if sent else 1


def check_stream_flags(args: argparse.Namespace, streaming: bool) -> None:
    """Flags that mean nothing with what was chosen: refused, not ignored."""
    problems = []
    if streaming and args.wait:
        problems.append("--wait is for --image and --text; follow a stream's results with autoglm tail")
    if args.with_audio and not args.video:
        problems.append("--with-audio needs --video (the audio track of the same input)")
    if args.follow and not args.text_file:
        problems.append("--follow needs --text-file")
    if args.loop and not (args.video or args.audio):
        problems.append("--loop needs --video or --audio (a file)")
    if problems:
        raise ConfigError(problems)


async def publish_stream(args: argparse.Namespace, nats: NatsConfig) -> int:
    from engine.sources.producer import Producer
    from engine.sources.reader import MediaOptions
    from engine.tools.stream import publish_stream
    from engine.transport.security import connect_kwargs

    media = MediaOptions(
        audio=args.with_audio,
        fps=args.fps,
        quality=None if args.raw else args.quality,
        chunk_ms=args.chunk_ms,
        loop=args.loop,
        realtime=not args.as_fast_as_possible,
        timeout=args.timeout,
        input_format=args.input_format,
    )
    async with Producer(
        nats.url or "",
        source=args.source,
        prefix=args.prefix or nats.subject_prefix,
        connect_opts=connect_kwargs(nats),
        id_prefix=args.id,
        traceparent=args.traceparent,
        claim_check=args.claim_check,
        bucket=nats.object_bucket,
    ) as producer:
        await publish_stream(
            producer,
            video=args.video,
            audio=args.audio,
            text_file="-" if args.text == "-" else args.text_file,
            follow=args.follow,
            media=media,
        )
    return 0


async def cmd_tail(args: argparse.Namespace) -> int:
    from engine.sources.results import Results
    from engine.tools.tail import tail
    from engine.transport.security import connect_kwargs
    from engine.transport.streams import stream_names

    nats = client_nats(args)
    if not nats.url:
        raise ConfigError([f"no NATS url: pass --nats-url or set {NATS_URL_ENV}"])
    results = Results(
        nats.url,
        sources=args.source or None,
        prefix=args.prefix or nats.subject_prefix,
        dlq=args.dlq,
        durable=args.durable,
        from_start=args.from_start,
        since=args.since,
        connect_opts=connect_kwargs(nats),
        stream=stream_names(nats)[1] if nats.stream else None,  # [nats] stream names it: no lookup
    )
    await tail(results, as_json=args.json, count=args.count)
    return 0
