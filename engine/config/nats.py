"""Where NATS is and who the engine is on it: ``[nats]``, ``[nats.auth]``,
``[nats.tls]``, and the ``AUTOGLM_NATS_*`` environment over them.

Secrets never leave as text: URLs are shown through :func:`redact_url` and
the problem lines never hold a password or token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_serializer, field_validator

from engine.config.checks import Frozen, shown, updated

NATS_URL_ENV = "AUTOGLM_NATS_URL"
#: The connection's inbox prefix (``nats.inbox_prefix``); ``--secure`` writes
#: one per user into its env file.
INBOX_PREFIX_ENV = "AUTOGLM_NATS_INBOX_PREFIX"
_INBOX_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


#: Where a comma starts the next server of a list: before a scheme.
_NEXT_URL_RE = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def server_urls(url: str) -> list[str]:
    """The servers of ``nats.url``: one URL, or several separated by commas
    (``nats://a:4222,nats://b:4222``, the nodes of a cluster), as the client
    libraries take them.

    A password may hold a comma, so where any URL carries user info the list
    is cut only before a scheme (``,nats://``): give every URL its scheme
    then. Without user info every comma separates (``a:4222,b:4222``)."""
    parts = _NEXT_URL_RE.split(url) if "@" in url else url.split(",")
    return [p.strip() for p in parts if p.strip()]


def redact_url(url: str) -> str:
    """``url`` fit to show, each server of a list (:func:`server_urls`) on its
    own: its user info (``user:password@`` or ``token@``) becomes ``***@``."""
    return ",".join(_redact_one(u) for u in server_urls(url)) if "," in url else _redact_one(url)


def _redact_one(url: str) -> str:
    """Everything up to the *last* ``@`` goes, so a password holding ``@``,
    ``/`` or ``,`` does not leak either."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


class AuthConfig(Frozen):
    """How the engine proves who it is: at most one of password, token, NKey, creds.

    Secrets are better given by environment (``AUTOGLM_NATS_PASSWORD``,
    ``AUTOGLM_NATS_TOKEN``) than in the file; either way they are never logged
    and ``<prefix>.svc.config`` shows them as ``**********``.
    """

    user: str = ""
    password: SecretStr = SecretStr("")
    token: SecretStr = SecretStr("")
    #: A file holding an NKey user seed (``SU...``).
    nkey_seed_file: str = ""
    #: A ``.creds`` file (user JWT + NKey seed) from nsc or a NATS operator.
    creds_file: str = ""


class TlsConfig(Frozen):
    """TLS to the server: ``ca`` to verify it, ``cert``/``key`` for mutual TLS."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    #: Name to verify the server's certificate against, when not the URL's host.
    hostname: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)


class NatsConfig(Frozen):
    """Where NATS is. No ``url`` (and no ``AUTOGLM_NATS_URL``) starts the embedded server."""

    #: One server, or the nodes of a cluster separated by commas
    #: (``nats://a:4222,nats://b:4222``): the client connects to one of them
    #: and moves to another when it goes away (see :func:`server_urls`).
    url: str | None = None
    auth: AuthConfig = AuthConfig()
    #: Replies to this connection's requests (JetStream's included) arrive on
    #: ``<inbox_prefix>.<unique>``. A server that gives each user its own
    #: (``autoglm run --secure``: ``_INBOX_<user>``) keeps users from reading
    #: each other's replies. ``AUTOGLM_NATS_INBOX_PREFIX`` overrides it.
    inbox_prefix: str = "_INBOX"
    tls: TlsConfig = TlsConfig()
    #: Claim check: the Object Store bucket for payloads over the server's
    #: max payload (engine/wire/claimcheck.py); the engine makes it with this TTL.
    object_bucket: str = Field("autoglm-payloads", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    object_ttl_s: float = Field(3600.0, gt=0)
    #: A claim-checked payload not fetched within this is ``object_missing``
    #: (metadata whose chunks expired first, or never came, must not hold intake).
    object_fetch_timeout_s: float = Field(15.0, gt=0, le=600)
    #: At most this many bytes of claim-checked payloads are kept (a full bucket
    #: refuses new ones, and the producer is told): producers cannot fill the
    #: JetStream store that the input and result streams need.
    object_max_bytes: int = Field(1024**3, gt=0)
    #: Embedded server only: a nats-server config file to start it with
    #: (authorization, TLS); ``autoglm run --secure`` writes one.
    server_config: str = ""
    subject_prefix: str = "autoglm"
    #: Embedded server: JetStream store and ports file live under here.
    data_dir: str = ".autoglm"
    connect_timeout_s: float = Field(5.0, gt=0)
    #: At-least-once intake through JetStream; unset = whenever the server has it.
    durable: bool | None = None
    #: Streams ``<stream>_IN`` (inputs) and ``<stream>_OUT`` (results, DLQ);
    #: empty: named after the subject prefix (``AUTOGLM_IN``...).
    stream: str = Field("", pattern=r"^[A-Za-z0-9_-]*$")
    consumer: str = Field("autoglm-engine", pattern=r"^[A-Za-z0-9_-]+$")
    ack_wait_s: float = Field(30.0, gt=0)
    max_ack_pending: int = Field(20_000, ge=1)
    #: Deliveries of one input before it is given up as ``poison`` (a DLQ
    #: record, then ``term``): an event that kills its handler is not retried forever.
    max_deliver: int = Field(5, ge=2, le=1000)
    fetch_batch: int = Field(500, ge=1, le=10_000)
    #: Limits of the *unprocessed* backlog (``<stream>_IN`` is a work queue:
    #: an event leaves it once its result or DLQ record is stored) and of the
    #: results stream.
    stream_max_age_s: float = Field(24 * 3600.0, gt=0)
    stream_max_bytes: int = Field(1024**3, gt=0)
    duplicate_window_s: float = Field(120.0, gt=0)
    #: Sources are spread over this many partitions (a subject transform on
    #: the input stream, ``{{partition(N,1)}}`` of the source token); each is
    #: owned by one live worker at a time. 1 = one partition, as before.
    #: Changing it needs an empty input stream (the engine refuses otherwise).
    partitions: int = Field(1, ge=1, le=256)
    #: A worker's hold on its partitions lasts this long without renewal
    #: (renewed every third of it): a dead worker's partitions move after
    #: about this long. It stops work on a partition it could not renew
    #: before the lease can pass to another.
    lease_s: float = Field(3.0, ge=1.0, le=120.0)
    #: Replicas of the streams and buckets the engine makes: 0 = as many as
    #: the cluster has servers (what the server advertises), at most 3; 1 on a
    #: single server. An existing stream or bucket is raised to it, never
    #: lowered (a start while a node is down counts one server less).
    replicas: int = Field(0, ge=0, le=5)
    #: Replay history: ``<stream>_REC`` mirrors the inputs with its own limits
    #: and drops its oldest when full (it never refuses an event). 0 = no recording.
    record_max_age_s: float = Field(24 * 3600.0, ge=0)
    record_max_bytes: int = Field(1024**3, ge=0)
    #: Durable mode: each source's GLM history and last frame sent (on_change)
    #: live in the KV bucket ``<stream>_GLM``, so a source that moves to
    #: another worker keeps its context. An entry lasts this long after its
    #: last write; the bucket holds at most this many bytes (full: the
    #: sources written longest ago go first, and start afresh).
    glm_state_ttl_s: float = Field(24 * 3600.0, gt=0)
    glm_state_max_bytes: int = Field(256 * 1024**2, gt=0)
    #: Sources whose state waits to be written (each once, as it stands when
    #: written); past it the one waiting longest is dropped and counted.
    glm_state_pending: int = Field(1024, ge=1)
    #: How long closing windows waits for a moved source's state to be read,
    #: and a handover for its last writes; past it the source starts afresh.
    glm_state_timeout_s: float = Field(2.0, gt=0, le=60)

    @field_validator("subject_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _PREFIX_RE.fullmatch(v):
            raise ValueError("must be dot-separated tokens of [A-Za-z0-9_-]")
        return v

    @field_serializer("url", when_used="json")
    def _shown_url(self, url: str | None) -> str | None:
        """``<prefix>.svc.config`` shows the configuration: no password in it."""
        return None if url is None else redact_url(url)


#: Environment variables for the connection's identity and TLS (containers,
#: secrets managers), over the file's ``[nats.auth]`` / ``[nats.tls]``.
AUTH_ENV = {
    "AUTOGLM_NATS_USER": ("auth", "user"),
    "AUTOGLM_NATS_PASSWORD": ("auth", "password"),
    "AUTOGLM_NATS_TOKEN": ("auth", "token"),
    "AUTOGLM_NATS_NKEY_SEED_FILE": ("auth", "nkey_seed_file"),
    "AUTOGLM_NATS_CREDS_FILE": ("auth", "creds_file"),
    "AUTOGLM_NATS_TLS_CA": ("tls", "ca"),
    "AUTOGLM_NATS_TLS_CERT": ("tls", "cert"),
    "AUTOGLM_NATS_TLS_KEY": ("tls", "key"),
    "AUTOGLM_NATS_TLS_HOSTNAME": ("tls", "hostname"),
}


def nats_from_env(nats: NatsConfig, env: Mapping[str, str]) -> NatsConfig:
    """``nats`` with ``AUTOGLM_NATS_URL``, ``AUTOGLM_NATS_INBOX_PREFIX`` and
    the ``AUTH_ENV`` variables applied (:func:`nats_problems` checks them)."""
    update: dict[str, Any] = {}
    if env.get(NATS_URL_ENV):
        update["url"] = env[NATS_URL_ENV]
    if env.get(INBOX_PREFIX_ENV):
        update["inbox_prefix"] = env[INBOX_PREFIX_ENV]
    for section in ("auth", "tls"):
        values = {key: env[var] for var, (sec, key) in AUTH_ENV.items() if sec == section and env.get(var)}
        if values:
            update[section] = updated(getattr(nats, section), values, ("env", section))
    return updated(nats, update, ("env",)) if update else nats


def nats_problems(nats: NatsConfig, where: str = "nats") -> list[str]:
    """Cross-field checks of auth and TLS; the messages never hold a secret."""
    a, t = nats.auth, nats.tls
    problems = []
    methods = [
        name
        for name, on in (
            ("password", bool(a.password.get_secret_value())),
            ("token", bool(a.token.get_secret_value())),
            ("nkey_seed_file", bool(a.nkey_seed_file)),
            ("creds_file", bool(a.creds_file)),
        )
        if on
    ]
    if len(methods) > 1:
        problems.append(f"{where}.auth: give one way to authenticate, not {' and '.join(methods)}")
    if a.password.get_secret_value() and not a.user:
        problems.append(f"{where}.auth.user: is required with a password")
    if bool(t.cert) != bool(t.key):
        problems.append(f"{where}.tls: cert and key go together (mutual TLS)")
    if not _INBOX_RE.fullmatch(nats.inbox_prefix):
        problems.append(
            f"{where}.inbox_prefix = {shown(nats.inbox_prefix)}: must be dot-separated tokens of "
            "[A-Za-z0-9_-] (no wildcards)"
        )
    for key, path in (
        ("auth.nkey_seed_file", a.nkey_seed_file),
        ("auth.creds_file", a.creds_file),
        ("tls.ca", t.ca),
        ("tls.cert", t.cert),
        ("tls.key", t.key),
        ("server_config", nats.server_config),
    ):
        if path and not Path(path).is_file():
            problems.append(f"{where}.{key} = {shown(path)}: file not found")
    return problems
