"""Claim check: events larger than the server's max payload travel through NATS's Object Store.

The producer puts the bytes in a bucket and publishes a small reference event
on the usual subject, with the usual headers, but::

    Content-Type: application/vnd.autoglm.object-ref
    body: {"bucket": "autoglm-payloads", "name": "<unique>", "content_type": "image/png",
           "size": 23554432, "sha256": "<64 hex digits: the payload's SHA-256>"}

The engine checks the reference (its own bucket, name, declared size against
``limits.max_payload_bytes``, a digest) before fetching anything, fetches the
object, checks that its bytes are the ones the digest names (else
``object_tampered``: someone rewrote the object after the reference was
made), and carries on as if the bytes had come in the message. Objects are
not deleted by the engine (a redelivered reference must still resolve); the
bucket's TTL (``nats.object_ttl_s``, set when the bucket is made) expires them.

The engine makes the bucket refuse rollup headers and deletes or purges
through the API (:func:`bucket`): a publish into it can add an object but
never wipe others. Producers store with :func:`put_payload`, which only
publishes, so the ``--secure`` producer needs no right to read the bucket.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from nats.js.api import DiscardPolicy, ObjectInfo, ObjectMetaOptions, StorageType, StreamConfig
from nats.js.errors import (
    BucketNotFoundError,
    DigestMismatchError,
    NoStreamResponseError,
    NotFoundError,
    ObjectNotFoundError,
)

from engine.contracts.errors import EventRejected, TransportError
from engine.contracts.subjects import object_chunks, object_meta
from engine.wire.codec import CONTENT_TYPE_HEADER, header

log = logging.getLogger("autoglm.claimcheck")

OBJECT_REF: Final = "application/vnd.autoglm.object-ref"
#: A reference is a few hundred bytes; anything much larger is not one.
MAX_REF_BYTES: Final = 4096
_BUCKET_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME_RE = re.compile(r"[A-Za-z0-9_.=-]{1,256}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: How nats-py and the Go client write an object's digest in its metadata.
_DIGEST_PREFIX: Final = "SHA-256="


@dataclass(frozen=True, slots=True)
class ObjectRef:
    bucket: str
    name: str
    content_type: str
    size: int
    #: The payload's SHA-256, lower-case hex: the engine refuses other bytes.
    sha256: str

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "bucket": self.bucket,
                "name": self.name,
                "content_type": self.content_type,
                "size": self.size,
                "sha256": self.sha256,
            }
        )


def is_ref(headers: Mapping[str, str] | None) -> bool:
    return (header(headers, CONTENT_TYPE_HEADER) or "").strip().lower().startswith(OBJECT_REF)


def _bad(what: str) -> EventRejected:
    return EventRejected("bad_object_ref", f"object reference: {what}")


def parse_ref(body: bytes, max_bytes: int) -> ObjectRef:
    """The reference in ``body``, checked; :class:`EventRejected` names what is wrong."""
    if len(body) > MAX_REF_BYTES:
        raise EventRejected("bad_object_ref", f"object reference is {len(body)} bytes (max {MAX_REF_BYTES})")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventRejected("bad_object_ref", f"object reference is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EventRejected("bad_object_ref", "object reference must be a JSON object")
    bucket, name, ctype, size, sha = (
        data.get(k) for k in ("bucket", "name", "content_type", "size", "sha256")
    )
    if not isinstance(bucket, str) or not _BUCKET_RE.fullmatch(bucket):
        raise EventRejected(
            "bad_object_ref", f"object reference: bucket={str(bucket)[:80]!r} is not a bucket name"
        )
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise EventRejected(
            "bad_object_ref", f"object reference: name={str(name)[:80]!r} is not an object name"
        )
    if not isinstance(ctype, str) or not ctype or ctype.startswith(OBJECT_REF):
        raise _bad("content_type must name the payload's type")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise _bad(f"size={size!r} must be a positive integer")
    if size > max_bytes:
        raise EventRejected(
            "payload_too_large", f"object {bucket}/{name} is {size} bytes, over max_payload_bytes={max_bytes}"
        )
    if sha is None:
        raise _bad("no sha256: a reference names its payload's SHA-256 (64 hex digits)")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha.lower()):
        raise _bad(f"sha256={str(sha)[:80]!r} is not 64 hex digits")
    return ObjectRef(bucket, name, ctype, size, sha.lower())


def _tampered(ref: ObjectRef, what: str) -> EventRejected:
    return EventRejected(
        "object_tampered", f"object {ref.bucket}/{ref.name} {what}: not the bytes its reference names"
    )


def _stored_sha256(info: Any) -> str | None:
    """The SHA-256 (hex) an object's metadata claims, ``None`` when it claims none."""
    digest = info.digest or ""
    if not digest.upper().startswith(_DIGEST_PREFIX):
        return None
    try:
        return base64.urlsafe_b64decode(digest[len(_DIGEST_PREFIX) :]).hex()
    except (binascii.Error, ValueError):
        return None


class _Bounded(io.BytesIO):
    """A buffer that keeps at most ``limit`` bytes: an object that grew
    after its reference was made cannot make the engine hold more."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.overflow = False

    def write(self, chunk: Any, /) -> int:
        n = len(chunk)
        if self.tell() + n > self.limit:
            self.overflow = True
            return n
        return super().write(chunk)


class ClaimChecks:
    """Resolves references into the engine's bucket (one JetStream context, the store cached)."""

    def __init__(self, js: Any, max_bytes: int, bucket: str, *, timeout: float = 15.0) -> None:
        self.js = js
        self.max_bytes = max_bytes
        self.bucket = bucket
        #: Seconds a fetch may take. nats-py waits for chunks without a limit, and
        #: metadata whose chunks never come (expired first, or never stored) would
        #: hold intake for good.
        self.timeout = timeout
        self._store: Any = None
        self.fetched = 0
        self.fetched_bytes = 0

    async def resolve(self, headers: Mapping[str, str], body: bytes) -> tuple[dict[str, str], bytes]:
        """Headers with the payload's own Content-Type, and the payload."""
        ref = parse_ref(body, self.max_bytes)
        if ref.bucket != self.bucket:  # another bucket is not the producers' to name
            raise _bad(f"bucket={ref.bucket!r} is not this engine's claim-check bucket")
        try:
            if self._store is None:
                self._store = await self.js.object_store(ref.bucket)
            info = await self._store.get_info(ref.name)
            # Before fetching anything: metadata rewritten to other bytes (or
            # to a link into another bucket) is not what the producer stored.
            if info.is_link() or _stored_sha256(info) != ref.sha256:
                raise _tampered(ref, "has another digest")
            if info.size != ref.size:
                raise EventRejected(
                    "bad_object_ref",
                    f"object {ref.bucket}/{ref.name} is {info.size} bytes, reference says {ref.size}",
                )
            # `get` without writeinto concatenates chunk by chunk (quadratic)
            buf = _Bounded(ref.size)
            await asyncio.wait_for(self._store.get(ref.name, writeinto=buf), self.timeout)
        except (BucketNotFoundError, ObjectNotFoundError):
            raise EventRejected(
                "object_missing", f"no object {ref.bucket}/{ref.name} (expired or never stored)"
            ) from None
        except DigestMismatchError:  # chunks added or replaced under the metadata
            raise _tampered(ref, "changed under its metadata") from None
        except EventRejected:
            raise
        except TimeoutError:
            raise EventRejected(
                "object_missing",
                f"the chunks of {ref.bucket}/{ref.name} did not come within {self.timeout:g} s "
                "(expired before its metadata, or never stored)",
            ) from None
        except Exception as exc:  # JetStream unavailable
            raise EventRejected(
                "object_missing", f"cannot fetch {ref.bucket}/{ref.name}: {type(exc).__name__}: {exc}"
            ) from exc
        data = buf.getvalue()
        if buf.overflow or len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise _tampered(ref, f"holds {'more than ' if buf.overflow else ''}{len(data)} other bytes")
        self.fetched += 1
        self.fetched_bytes += len(data)
        return {**headers, CONTENT_TYPE_HEADER: ref.content_type}, data


async def setup(
    nc: Any,
    bucket_name: str,
    ttl_s: float,
    max_bytes: int,
    *,
    timeout: float = 15.0,
    bucket_bytes: int = -1,
    replicas: int = 1,
) -> ClaimChecks | None:
    """The engine's claim checks: the bucket made (with its TTL and
    ``replicas``) when the server has JetStream; ``None`` without JetStream,
    so a reference event is refused as ``object_missing``."""
    js = nc.jetstream()
    try:
        await js.account_info()
    except Exception:  # no JetStream here
        return None
    try:
        await bucket(js, bucket_name, ttl_s, bucket_bytes, replicas)
    except Exception as exc:  # e.g. a user not allowed to make streams: producers must make it
        log.warning("claim-check bucket %s not created: %s", bucket_name, exc)
    return ClaimChecks(js, max_bytes, bucket_name, timeout=timeout)


async def bucket(js: Any, name: str, ttl_s: float, max_bytes: int = -1, replicas: int = 1) -> None:
    """Make the claim-check bucket (with its TTL) when it does not exist yet;
    either way, one that refuses rollups, deletes and purges, (given
    ``max_bytes``) holds at most that much: producers cannot fill the store,
    and has at least ``replicas`` (one a producer made has 1; never lowered).

    nats-py's own buckets accept a ``Nats-Rollup`` header, with which a
    single publish on ``$O.<bucket>.M.<any>`` (``all``) or on another
    object's chunks (``sub``) erases objects: whoever may put an object
    could wipe everyone's. :func:`put_payload` needs no rollup; the engine
    never deletes (the TTL does)."""
    stream = f"OBJ_{name}"
    try:
        config = (await js.stream_info(stream)).config
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=stream,
                subjects=[object_chunks(name), object_meta(name)],
                max_age=ttl_s,
                max_bytes=max_bytes,
                storage=StorageType.FILE,
                discard=DiscardPolicy.NEW,
                allow_direct=True,
                allow_rollup_hdrs=False,
                deny_delete=True,
                deny_purge=True,
                num_replicas=replicas,
            )
        )
        return
    limit_changes = max_bytes > 0 and config.max_bytes != max_bytes
    fewer = (config.num_replicas or 1) < replicas
    if config.allow_rollup_hdrs or not config.deny_delete or not config.deny_purge or limit_changes or fewer:
        config.allow_rollup_hdrs, config.deny_delete, config.deny_purge = False, True, True
        if max_bytes > 0:
            config.max_bytes = max_bytes
        config.num_replicas = max(config.num_replicas or 1, replicas)
        await js.update_stream(config)
        log.info("claim-check bucket %s: no rollups, deletes, purges; %d replicas", name, config.num_replicas)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


async def _put(js: Any, bucket_name: str, data: bytes, content_type: str, chunk: int) -> ObjectRef:
    name, nuid = uuid.uuid4().hex, uuid.uuid4().hex  # random: no one else can aim at them
    chunks = 0
    for at in range(0, len(data), chunk):
        await js.publish(object_chunks(bucket_name, nuid), data[at : at + chunk])
        chunks += 1
    sha = hashlib.sha256(data).digest()
    info = ObjectInfo(
        name=name,
        bucket=bucket_name,
        nuid=nuid,
        size=len(data),
        chunks=chunks,
        digest=_DIGEST_PREFIX + _b64(sha),
        mtime=datetime.now(UTC).isoformat(),
        options=ObjectMetaOptions(max_chunk_size=chunk),
    )
    await js.publish(object_meta(bucket_name, _b64(name.encode())), orjson.dumps(info.as_dict()))
    return ObjectRef(bucket_name, name, content_type, len(data), sha.hex())


async def put_payload(
    js: Any,
    bucket_name: str,
    data: bytes,
    content_type: str,
    ttl_s: float = 3600.0,
    max_payload: int = 1024 * 1024,
) -> ObjectRef:
    """Store ``data`` and return the reference to publish in its place (producers).

    The chunks and then the metadata are published as nats-py's
    ``ObjectStore.put`` writes them, minus its lookup of the name first (a
    read, which the ``--secure`` producer may not make) and its rollup header
    (which :func:`bucket` refuses). A missing bucket is made, by a user
    allowed to, and the put tried again.

    ``max_payload`` is the server's (``nc.max_payload``): chunks must fit in it,
    and nats-py's default chunk (128 KiB) does not on a server set lower."""
    chunk = max(1024, min(128 * 1024, max_payload - 4096))
    try:
        return await _put(js, bucket_name, data, content_type, chunk)
    except NoStreamResponseError:  # no bucket yet
        pass
    try:
        await bucket(js, bucket_name, ttl_s)
    except Exception as exc:  # e.g. the --secure producer: the engine makes the bucket
        raise TransportError(
            f"claim-check bucket {bucket_name} does not exist and cannot be made here "
            f"({type(exc).__name__}: {exc}); start the engine first"
        ) from exc
    return await _put(js, bucket_name, data, content_type, chunk)
