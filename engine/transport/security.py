"""Who the engine and its tools are on NATS, and a locked-down embedded server.

:func:`security_for` turns ``[nats.auth]`` / ``[nats.tls]`` (after the
``AUTOGLM_NATS_*`` environment) into FastStream's NATS security object; the
engine's broker takes it as is (with ``nats.inbox_prefix``) and the
command-line tools pass :func:`connect_kwargs` (the same things as nats-py
arguments) to ``nats.connect``, so there is one reading of the settings.

:func:`lock_down` is ``autoglm run --secure``: random passwords for two users
with the least each needs, as a nats-server ``authorization`` block, and an
env file per user (0600) that the tools read.

    producer  publish <prefix>.in.> (core-mode partitions: <prefix>.part.*.>
              too) and new objects into the claim-check
              bucket; it reads nothing: no results, no DLQ, no object, no
              other user's replies
    engine    subscribe <prefix>.in.>, publish results/DLQ/late, JetStream,
              its micro-service endpoints (it may answer whoever asks);
              used by ``autoglm status/reload/health/replay``
    reader    subscribe <prefix>.out.>, .dlq.>, .late.>, and its own
              consumers on the results stream: a results consumer; ask
              $SRV.PING/INFO/STATS.autoglm (``autoglm monitor --secure``)

Each user has its own inbox prefix (``_INBOX_<user>``, written into its env
file as ``AUTOGLM_NATS_INBOX_PREFIX``) and may subscribe only there, so no
one reads another's replies: JetStream deliveries, object chunks, ``$SRV``
and ``<prefix>.svc`` answers all travel on the asker's inbox.
"""

from __future__ import annotations

import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faststream.nats.security import (
    NatsCredentials,
    NatsNKey,
    NatsSecurity,
    NatsToken,
    NatsUserPassword,
    parse_security,
)

from engine.config.models import NatsConfig, TlsConfig
from engine.config.nats import INBOX_PREFIX_ENV
from engine.config.nats import redact_url as redact_url  # its home is config; callers import it here
from engine.config.nats import server_urls as server_urls
from engine.contracts.errors import ConfigError
from engine.contracts.subjects import SRV_ALL, Subjects, object_chunks, object_meta, srv
from engine.transport.streams import glm_bucket, state_bucket, stream_names, workers_bucket

#: The Object Store bucket for claim-checked payloads (engine/wire/claimcheck.py).
DEFAULT_BUCKET = "autoglm-payloads"
USERS = ("producer", "engine", "reader")


def inbox_prefix(user: str) -> str:
    """The inbox prefix ``--secure`` gives ``user``: its replies arrive under
    ``<it>.>``, where only it may subscribe."""
    return f"_INBOX_{user}"


def ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca or None)
        if tls.cert:
            ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"nats.tls: cannot load {tls.ca or tls.cert}: {exc}"]) from exc
    return ctx


def security_for(nats: NatsConfig) -> NatsSecurity | None:
    """FastStream's security object for these settings (``None``: anonymous, plain)."""
    a, ctx = nats.auth, ssl_context(nats.tls)
    tls: dict[str, Any] = {"ssl_context": ctx, "tls_hostname": nats.tls.hostname or None}
    if a.creds_file:
        return NatsCredentials.from_file(a.creds_file, **tls)
    if a.nkey_seed_file:
        return NatsNKey.from_file(a.nkey_seed_file, **tls)
    if a.token.get_secret_value():
        return NatsToken(a.token.get_secret_value(), **tls)
    if a.user:
        return NatsUserPassword(a.user, a.password.get_secret_value(), **tls)
    return NatsSecurity(**tls) if ctx is not None else None


def connect_kwargs(nats: NatsConfig) -> dict[str, Any]:
    """The same settings as ``nats.connect`` keyword arguments, and the inbox prefix."""
    kwargs = {k: v for k, v in parse_security(security_for(nats)).items() if v is not None}
    kwargs["inbox_prefix"] = nats.inbox_prefix
    return kwargs


@dataclass(frozen=True)
class LockedDown:
    """What ``--secure`` wrote: the server config and one env file per user."""

    server_config: Path
    env_files: dict[str, Path]
    passwords: dict[str, str]


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def _list(subjects: list[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in subjects) + "]"


def permissions(nats: NatsConfig) -> dict[str, dict[str, Any]]:
    """Least privilege per user: nats-server publish/subscribe allow lists
    (and ``allow_responses`` where a user answers requests)."""
    prefix, bucket = nats.subject_prefix, nats.object_bucket
    _, out_stream = stream_names(nats)
    # An object is chunks on $O.<bucket>.C.<nuid> and then its metadata on
    # $O.<bucket>.M.<name>: a producer publishes both (one token each) and
    # reads the PubAcks on its inbox. No $JS.API at all: it cannot look an
    # object up, read one (STREAM.MSG.GET, DIRECT.GET, a consumer), purge or
    # delete one; the bucket refuses rollups (claimcheck.bucket), so a
    # publish cannot wipe objects either; and the engine verifies each
    # object's sha256 against the reference (object_tampered).
    objects = [object_chunks(bucket, "*"), object_meta(bucket, "*")]
    out = out_stream
    s = Subjects(prefix)
    # Core mode with partitions: the server maps each input to
    # <prefix>.part.<p>.<source>.<modality> and checks the producer's publish
    # permission on that subject, not on the one it published; each worker
    # subscribes to its partitions there. (Durable mode maps in the stream.)
    mapped = [s.partition("*")] if nats.durable is False and nats.partitions > 1 else []
    return {
        "producer": {
            "publish": [s.inputs, *mapped, *objects],
            "subscribe": [f"{inbox_prefix('producer')}.>"],
        },
        "engine": {
            "publish": [
                *s.outputs, s.services,
                "$JS.API.>", "$JS.ACK.>", "$JS.FC.>", SRV_ALL,
                f"$KV.{state_bucket(nats)}.>",  # how its last run ended (transport/recovery.py, crash guard)
                f"$KV.{workers_bucket(nats)}.>",  # its leases (transport/partitions.py)
                f"$KV.{glm_bucket(nats)}.>",  # each source's GLM state (glm/memory.py)
            ],
            "subscribe": [s.inputs, *mapped, s.services, SRV_ALL, f"{inbox_prefix('engine')}.>"],
            # It answers $SRV and <prefix>.svc requests on the asker's inbox,
            # one reply per request, and may publish on no other inbox.
            "allow_responses": True,
        },
        "reader": {
            # Its own consumers on the results stream, and message gets there;
            # nothing on the input stream, no deletes, no purges.
            # (CREATE.<stream>.<name>.<filter> is how nats-py makes a named
            # or filtered consumer on a 2.9+ server; INFO, before a durable.)
            "publish": [
                f"$JS.API.STREAM.INFO.{out}",
                f"$JS.API.CONSUMER.CREATE.{out}", f"$JS.API.CONSUMER.CREATE.{out}.>",
                f"$JS.API.CONSUMER.INFO.{out}.*", f"$JS.API.CONSUMER.MSG.NEXT.{out}.*",
                f"$JS.API.STREAM.MSG.GET.{out}", f"$JS.API.DIRECT.GET.{out}", f"$JS.API.DIRECT.GET.{out}.>",
                f"$JS.ACK.{out}.>", f"$JS.FC.{out}.>",
                # Discovery and counters, for `autoglm monitor --secure` (read-only: no
                # <prefix>.svc endpoint, so neither the config nor a reload).
                srv("PING"), srv("INFO"), srv("STATS"),
            ],
            "subscribe": [
                *s.outputs, f"{inbox_prefix('reader')}.>",
            ],
        },
    }  # fmt: skip


def lock_down(directory: str | Path, nats: NatsConfig) -> LockedDown:
    """Write ``server.conf`` and ``<user>.env`` (0600) under ``directory``.

    Fresh passwords on every call: a leaked env file stops working at the
    next ``--secure`` start.
    """
    root = Path(directory)
    passwords = {user: secrets.token_urlsafe(24) for user in USERS}
    users = []
    for user, perms in permissions(nats).items():
        responses = ", allow_responses: true" if perms.get("allow_responses") else ""
        users.append(
            f'    {{ user: "{user}", password: "{passwords[user]}", permissions: {{ '
            f"publish: {{ allow: {_list(perms['publish'])} }}, "
            f"subscribe: {{ allow: {_list(perms['subscribe'])} }}{responses} }} }}"
        )
    conf = root / "server.conf"
    body = "\n".join(users)
    _write_private(
        conf, f"# written by autoglm run --secure\nauthorization {{\n  users = [\n{body}\n  ]\n}}\n"
    )
    env_files = {}
    for user, password in passwords.items():
        env_files[user] = root / f"{user}.env"
        _write_private(
            env_files[user],
            f"AUTOGLM_NATS_USER={user}\nAUTOGLM_NATS_PASSWORD={password}\n"
            f"{INBOX_PREFIX_ENV}={inbox_prefix(user)}\n",
        )
    return LockedDown(conf, env_files, passwords)


def read_env_file(path: str | Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (what :func:`lock_down` writes), for ``--auth-file``."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out
