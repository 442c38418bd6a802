"""The commands that need no engine: ``validate``, ``replay``, ``export``, ``distill``."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from engine.config.models import (
    load_config,
)
from engine.contracts.errors import ConfigError
from engine.contracts.plugins import REFUSED
from engine.tools.options import DEFAULT_CONFIG, open_nats, read_config


def cmd_validate(args: argparse.Namespace) -> int:
    path = args.file or DEFAULT_CONFIG
    if not Path(path).is_file():  # one line (main's handler), not a report of one problem
        what = "is a directory, not a routing file" if Path(path).is_dir() else "no such file"
        raise ConfigError([f"{path}: {what}"])
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid", file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    routes = ", ".join(
        f"{r.modality}->{'+'.join([r.processor, *(a.processor for a in r.also)])}" for r in cfg.routes
    )
    print(
        f"{path}: ok ({routes}; aligner {cfg.aligner.mode} {cfg.aligner.window_ms} ms; glm {cfg.glm.backend})"
    )
    for name, why in sorted(REFUSED.items()):  # unused by any route, so only a note
        print(f"  note: processor {name!r} (no route uses it): {why}", file=sys.stderr)
    return 0


async def cmd_replay(args: argparse.Namespace) -> int:
    from engine.tools.replay import replay, stderr, summary

    cfg = read_config(args.config)
    # --out is opened before connecting: an unwritable path is refused at once
    out = open(args.out, "wb") if args.out and args.out != "-" else None  # noqa: ASYNC230, SIM115
    try:
        nc, _ = await open_nats(args)
        started = time.monotonic()
        try:
            stats = await replay(nc, cfg, args.since, args.speed, out or sys.stdout.buffer)
        finally:
            await nc.close()
    finally:
        if out is not None:
            out.close()
    stderr(summary(stats, time.monotonic() - started))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from engine.tools.export import export_image, image_params

    config = read_config(args.config)
    thresholds = {"min_cosine": args.min_cosine, "min_cosine_int8": args.min_cosine_int8}
    if args.route == "text":  # int8 is dynamic for a transformer (engine.tools.export_text)
        from engine.tools.export_text import export_text, text_params

        written = export_text(
            text_params(config),
            Path(args.out),
            int8=args.int8 is not None,
            samples=args.samples,
            **thresholds,
        )
    else:
        written = export_image(
            image_params(config, args.route),
            Path(args.out),
            int8=args.int8,
            calibrate=Path(args.calibrate) if args.calibrate else None,
            samples=args.samples,
            **thresholds,
        )
    for e in written:
        f = e.fidelity
        top1 = "" if math.isnan(f.top1) else f", top-1 agreement {f.top1:.1%}"
        print(
            f"{e.path} ({e.precision}, {e.version}): cosine to torch mean {f.cosine_mean:.4f} "
            f"min {f.cosine_min:.4f}{top1} on {f.samples} samples"
        )
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from engine.tools.distill import distill

    r = distill(
        args.teacher,
        args.student,
        Path(args.frames),
        Path(args.out),
        epochs=args.epochs,
        alpha=args.alpha,
        temperature=args.temperature,
        teacher_weights=args.teacher_weights,
        teacher_weights_path=args.teacher_weights_path,
        input_size=args.input_size,
        resume=args.resume,
    )
    for when, e in (("untrained", r.before), ("distilled", r.after)):
        print(
            f"{when}: embedding cosine to the teacher {e.cosine:.4f}, top-1 agreement {e.top1:.1%}, "
            f"student {e.student_items_s:.0f} items/s vs teacher {e.teacher_items_s:.0f}"
        )
    print(f'{r.path} ({r.version}); route: model = {args.student!r}, weights = "imagenet", weights_path')
    return 0
