"""Claim check: events larger than the server's max payload travel through NATS's Object Store.

The producer puts the bytes in a bucket and publishes a small reference event
on the usual subject, with the usual headers, but::

    Content-Type: application/vnd.autoglm.object-ref
    body: {"bucket": "autoglm-payloads", "name": "<unique>", "content_type": "image/png", "size": 23554432}

The engine checks the reference (bucket, name, declared size against
``limits.max_payload_bytes``) before fetching anything, fetches the object,
and carries on as if the bytes had come in the message. Objects are not
deleted by the engine (a redelivered reference must still resolve); the
bucket's TTL (``nats.object_ttl_s``, set when the bucket is made) expires them.
"""

from __future__ import annotations

import io
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError

from engine.codec import CONTENT_TYPE_HEADER
from engine.errors import EventRejected

log = logging.getLogger("autoglm.claimcheck")

OBJECT_REF: Final = "application/vnd.autoglm.object-ref"
#: A reference is a few hundred bytes; anything much larger is not one.
MAX_REF_BYTES: Final = 4096
_BUCKET_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME_RE = re.compile(r"[A-Za-z0-9_.=-]{1,256}")


@dataclass(frozen=True, slots=True)
class ObjectRef:
    bucket: str
    name: str
    content_type: str
    size: int

    def encode(self) -> bytes:
        return orjson.dumps(
            {"bucket": self.bucket, "name": self.name, "content_type": self.content_type, "size": self.size}
        )


def is_ref(headers: Mapping[str, str] | None) -> bool:
    return bool(headers) and (headers or {}).get(CONTENT_TYPE_HEADER, "").startswith(OBJECT_REF)


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
    bucket, name, ctype, size = (data.get(k) for k in ("bucket", "name", "content_type", "size"))
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
    return ObjectRef(bucket, name, ctype, size)


class ClaimChecks:
    """Resolves references for the engine (one JetStream context, stores cached)."""

    def __init__(self, js: Any, max_bytes: int) -> None:
        self.js = js
        self.max_bytes = max_bytes
        self._stores: dict[str, Any] = {}
        self.fetched = 0
        self.fetched_bytes = 0

    async def resolve(self, headers: Mapping[str, str], body: bytes) -> tuple[dict[str, str], bytes]:
        """Headers with the payload's own Content-Type, and the payload."""
        ref = parse_ref(body, self.max_bytes)
        store = self._stores.get(ref.bucket)
        try:
            if store is None:
                store = await self.js.object_store(ref.bucket)
                if len(self._stores) < 64:
                    self._stores[ref.bucket] = store
            info = await store.get_info(ref.name)
            if info.size != ref.size:
                raise EventRejected(
                    "bad_object_ref",
                    f"object {ref.bucket}/{ref.name} is {info.size} bytes, reference says {ref.size}",
                )
            buf = io.BytesIO()  # `get` without writeinto concatenates chunk by chunk (quadratic)
            await store.get(ref.name, writeinto=buf)
        except (BucketNotFoundError, ObjectNotFoundError):
            raise EventRejected(
                "object_missing", f"no object {ref.bucket}/{ref.name} (expired or never stored)"
            ) from None
        except EventRejected:
            raise
        except Exception as exc:  # JetStream unavailable, digest mismatch, timeouts
            raise EventRejected(
                "object_missing", f"cannot fetch {ref.bucket}/{ref.name}: {type(exc).__name__}: {exc}"
            ) from exc
        data = buf.getvalue()
        self.fetched += 1
        self.fetched_bytes += len(data)
        return {**headers, CONTENT_TYPE_HEADER: ref.content_type}, data


async def setup(nc: Any, bucket_name: str, ttl_s: float, max_bytes: int) -> ClaimChecks | None:
    """The engine's claim checks: the bucket made (with its TTL) when the
    server has JetStream; ``None`` without JetStream, so a reference event is
    refused as ``object_missing``."""
    js = nc.jetstream()
    try:
        await js.account_info()
    except Exception:  # no JetStream here
        return None
    try:
        await bucket(js, bucket_name, ttl_s)
    except Exception as exc:  # e.g. a user not allowed to make streams: producers must make it
        log.warning("claim-check bucket %s not created: %s", bucket_name, exc)
    return ClaimChecks(js, max_bytes)


async def bucket(js: Any, name: str, ttl_s: float) -> Any:
    """The claim-check bucket, made (with its TTL) when it does not exist yet."""
    try:
        return await js.object_store(name)
    except BucketNotFoundError:
        return await js.create_object_store(name, config=ObjectStoreConfig(ttl=ttl_s))


async def put_payload(
    js: Any,
    bucket_name: str,
    data: bytes,
    content_type: str,
    ttl_s: float = 3600.0,
    max_payload: int = 1024 * 1024,
) -> ObjectRef:
    """Store ``data`` and return the reference to publish in its place (producers).

    ``max_payload`` is the server's (``nc.max_payload``): chunks must fit in it,
    and nats-py's default chunk (128 KiB) does not on a server set lower."""
    store = await bucket(js, bucket_name, ttl_s)
    name = uuid.uuid4().hex
    chunk = max(1024, min(128 * 1024, max_payload - 4096))
    await store.put(name, data, meta=ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=chunk)))
    return ObjectRef(bucket_name, name, content_type, len(data))
