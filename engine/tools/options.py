"""Shared by the commands: the routing file they read, and the NATS connection they open."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from engine.config.models import (
    NATS_URL_ENV,
    EngineConfig,
    NatsConfig,
    load_config,
    nats_from_env,
    nats_problems,
    updated,
)
from engine.contracts.errors import ConfigError

DEFAULT_CONFIG = "routing.toml"


def read_config(path: str | None) -> EngineConfig:
    """``--config`` if given, else ./routing.toml, else the built-in defaults."""
    if path is None and not Path(DEFAULT_CONFIG).exists():
        from engine.tools.demo import default_config

        return default_config()
    return load_config(path or DEFAULT_CONFIG)


def client_nats(args: argparse.Namespace) -> NatsConfig:
    """A tool's connection: ``--config``'s ``[nats]`` if given, then the
    environment, then ``--auth-file`` (an env file such as ``--secure`` writes),
    then ``--nats-url``."""
    from engine.transport.security import read_env_file

    env = dict(os.environ)
    if getattr(args, "auth_file", None):
        env.update(read_env_file(args.auth_file))
    base = load_config(args.config).nats if getattr(args, "config", None) else NatsConfig()
    nats = nats_from_env(base, env)
    if getattr(args, "nats_url", None):
        nats = updated(nats, {"url": args.nats_url}, ("nats",))
    problems = nats_problems(nats)
    if problems:
        raise ConfigError(problems)
    return nats


async def open_nats(args: argparse.Namespace, timeout: float = 5.0) -> tuple[Any, NatsConfig]:
    from engine.tools.publish import connect
    from engine.transport.security import connect_kwargs

    nats = client_nats(args)
    if not nats.url:
        raise ConfigError([f"no NATS url: pass --nats-url or set {NATS_URL_ENV}"])
    return await connect(nats.url, timeout=timeout, **connect_kwargs(nats)), nats
