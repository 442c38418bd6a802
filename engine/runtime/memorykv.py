"""The GLM memory's store (:class:`~engine.glm.memory.StateStore`) in a NATS KV bucket.

``<STREAM>_GLM``, shared by every worker of one configuration, one key per
source (a source token is a valid key). Bounded twice: an entry expires
``nats.glm_state_ttl_s`` after its last write, and the bucket holds at most
``nats.glm_state_max_bytes``; full, it drops the sources written longest ago
(discard ``old``: they start afresh, as after the TTL) rather than refusing
the sources being worked on. Reads go to the stream's leader (no direct
gets): a replica could still miss the write the last owner just made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError

from engine.contracts.errors import TransportError
from engine.transport.streams import glm_bucket

if TYPE_CHECKING:
    from engine.config.models import NatsConfig


class KVStateStore:
    """Each source's GLM state under its own key; writes conditional on the revision."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: Any, config: NatsConfig, replicas: int = 1) -> KVStateStore:
        """Bind to the bucket, making it first if no worker has."""
        name = glm_bucket(config)
        try:
            try:
                kv = await js.key_value(name)
            except BucketNotFoundError:
                try:
                    kv = await js.create_key_value(
                        KeyValueConfig(
                            bucket=name,
                            history=1,
                            ttl=config.glm_state_ttl_s,
                            max_bytes=config.glm_state_max_bytes,
                            storage=StorageType.FILE,
                            replicas=replicas,
                        )
                    )
                except Exception:  # another worker made it meanwhile
                    kv = await js.key_value(name)
            stream = f"KV_{name}"
            cfg = (await js.stream_info(stream)).config
            if getattr(cfg.discard, "value", cfg.discard) != DiscardPolicy.OLD.value:
                cfg.discard = DiscardPolicy.OLD
                await js.update_stream(cfg)
        except Exception as exc:  # nats-py raises APIError, TimeoutError, NoRespondersError...
            raise TransportError(f"the GLM state bucket {name} could not be set up: {exc}") from exc
        return cls(kv)

    async def read(self, source: str) -> tuple[bytes, int] | None:
        try:
            entry = await self.kv.get(source)
        except KeyNotFoundError:  # never written, deleted, or expired
            return None
        except Exception as exc:
            raise TransportError(f"reading the GLM state of {source}: {exc}") from exc
        return entry.value or b"", int(entry.revision)

    async def write(self, source: str, value: bytes, revision: int) -> int | None:
        try:
            if revision:
                return int(await self.kv.update(source, value, last=revision))
            return int(await self.kv.create(source, value))
        except KeyWrongLastSequenceError:
            return None
        except Exception as exc:
            raise TransportError(f"writing the GLM state of {source}: {exc}") from exc
