"""The producer SDK: events onto the wire contract from Python.

    async with Producer(url, source="cam0") as p:
        await p.image(frame)            # a BGR ndarray (JPEG-encoded here) or JPEG/PNG bytes
        await p.audio(samples, 16_000)  # float32 (f32le) or int16 (s16le), (N,) or (N, C)
        await p.text("a red ball")

Every event gets the contract's headers (``AutoGLM-Timestamp``,
``Content-Type``, a ``Nats-Msg-Id`` that names the source, ``AutoGLM-Seq``
and one ``traceparent`` per producer), and a body over the server's max
payload goes through the claim check by itself. The first event finds the
mode: where a JetStream stream stores the inputs (durable mode) every event
then waits for its PubAck with at most ``max_in_flight`` unanswered, so a
stalled server slows the producer down instead of filling its memory; an
event whose PubAck fails or never comes (a server restart) is sent again
under its same id (the stream drops a second copy) for up to ``resend_s``.
Where nothing answers (core mode) events are published plainly, and every
few seconds the producer asks again whether a stream stores them now (an
engine started after it); ``durable=True`` refuses core mode instead.
``autoglm publish`` is built on this class.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, Self

import numpy as np
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import (
    APIError,
    NotFoundError,
    ServiceUnavailableError,
    TooManyStalledMsgsError,
)

from engine.contracts.errors import AutoGLMError, TransportError
from engine.contracts.subjects import Subjects, valid_source
from engine.contracts.types import Modality
from engine.observe.tracing import new_traceparent
from engine.transport.sync import connect
from engine.wire.claimcheck import OBJECT_REF, put_payload
from engine.wire.codec import encode_headers

#: Room left under the server's max payload for the headers of a message.
_HEADER_ROOM = 4096


def sniff_image(data: bytes) -> str | None:
    """``image/jpeg`` or ``image/png`` from the magic bytes, else ``None``."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:2] == b"\xff\xd8":
        return "image/jpeg"
    return None


def encode_frame(frame: np.ndarray[Any, Any], quality: int | None) -> tuple[bytes, str]:
    """A BGR ``(H, W, 3)`` uint8 frame as JPEG at ``quality``, or raw BGR when ``quality`` is None."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise AutoGLMError(
            f"an image frame must be a (H, W, 3) uint8 BGR array, not {frame.shape} {frame.dtype}"
        )
    if quality is None:
        h, w = frame.shape[:2]
        return np.ascontiguousarray(frame).tobytes(), f"image/x-raw;format=bgr8;width={w};height={h}"
    import cv2  # here: an engine's image route loads OpenCV first, with its pixel cap

    ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise AutoGLMError("OpenCV could not encode the frame as JPEG")
    return jpeg.tobytes(), "image/jpeg"


def pcm_body(samples: np.ndarray[Any, Any], rate: int) -> tuple[bytes, str]:
    """float samples as f32le, int16 as s16le; ``(N,)`` is mono, ``(N, C)`` C channels."""
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.ndim != 2:
        raise AutoGLMError(f"audio samples must be (N,) or (N, channels), not {samples.shape}")
    fmt = "s16le" if samples.dtype == np.int16 else "f32le"
    body = np.ascontiguousarray(samples, dtype="<i2" if fmt == "s16le" else "<f4").tobytes()
    return body, f"audio/pcm;rate={rate};channels={samples.shape[1]};format={fmt}"


#: Seconds between core mode's questions whether a stream stores the inputs now.
RECHECK_S = 5.0


class Producer:
    """One source's events onto ``<prefix>.in.<source>.<modality>`` (see the module docstring)."""

    def __init__(
        self,
        url: str = "",
        *,
        source: str,
        prefix: str = "autoglm",
        nc: Any = None,
        connect_opts: dict[str, Any] | None = None,
        quality: int | None = 90,
        id_prefix: str | None = None,
        traceparent: str | None = None,
        claim_check: bool = False,
        bucket: str = "autoglm-payloads",
        max_in_flight: int = 256,
        ack_timeout: float = 10.0,
        resend_s: float = 60.0,
        durable: bool | None = None,
    ) -> None:
        if not valid_source(source):
            raise AutoGLMError(f"source {source!r}: 1-64 of [A-Za-z0-9_-]")
        if nc is None and not url:
            raise AutoGLMError("Producer needs a NATS url (or a connected client as nc=)")
        self.source, self.subjects, self.quality = source, Subjects(prefix), quality
        self.traceparent = traceparent or new_traceparent()
        self.claim_check, self.bucket = claim_check, bucket
        self.max_in_flight, self.ack_timeout = max_in_flight, ack_timeout
        self.sent: Counter[Modality] = Counter()
        #: (bytes, object name) of each payload that went by claim check.
        self.claims: list[tuple[int, str]] = []
        #: True: a stream stores the inputs (PubAcks); False: core mode; None: nothing sent yet.
        self.durable: bool | None = None
        #: ``durable=True``: refuse to send when no stream stores the inputs
        #: (instead of falling back to core mode, where nothing confirms them).
        self.require_durable = durable is True
        #: How long an event whose PubAck failed (a server restart) is sent
        #: again, under its same id (the stream drops a second copy), before
        #: the producer gives up and names it.
        self.resend_s = resend_s
        #: Events sent again after their PubAck failed or did not come.
        self.resent = 0
        #: Ids the input stream already held (it dropped these events as duplicates).
        self.duplicates: list[str] = []
        self._url, self._opts, self._nc, self._own = url, connect_opts or {}, nc, nc is None
        self._ids = id_prefix or f"{source}-{time.time_ns()}"
        self._seq = 0
        #: PubAck future -> the id of its event, while it waits.
        self._acks: dict[asyncio.Future[Any], str] = {}
        #: id -> (subject, body, headers) of each event not yet confirmed.
        self._unconfirmed: dict[str, tuple[str, bytes, dict[str, str]]] = {}
        #: Ids to send again (their PubAck failed, or never came).
        self._resend: list[str] = []
        #: When core mode last asked whether a stream stores the inputs now.
        self._probed = 0.0
        self._failed: list[str] = []
        self._js: Any = None

    async def __aenter__(self) -> Self:
        if self._nc is None:
            self._nc = await connect(self._url, **self._opts)
        # timeout: the JetStream API's (the stream lookup); a PubAck waits ack_timeout.
        self._js = self._nc.jetstream(timeout=2.0, publish_async_max_pending=self.max_in_flight)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                await self.flush()
        finally:
            if self._own and self._nc is not None:
                await self._nc.close()

    # -- one event per modality -------------------------------------------------------

    async def image(
        self, frame: np.ndarray[Any, Any] | bytes, ts: int | None = None, *, event_id: str | None = None
    ) -> str:
        """A BGR frame (JPEG at ``quality``, raw BGR with ``quality=None``) or JPEG/PNG bytes."""
        if isinstance(frame, bytes):
            sniffed = sniff_image(frame)
            if sniffed is None:
                raise AutoGLMError("image bytes are neither JPEG nor PNG")
            return await self.send("image", frame, sniffed, ts, event_id=event_id)
        body, ct = await asyncio.to_thread(encode_frame, frame, self.quality)
        return await self.send("image", body, ct, ts, event_id=event_id)

    async def audio(
        self, samples: np.ndarray[Any, Any], rate: int, ts: int | None = None, *, event_id: str | None = None
    ) -> str:
        """One chunk of PCM samples at ``rate`` Hz, stamped with its first sample's time."""
        body, ct = pcm_body(samples, rate)
        return await self.send("audio", body, ct, ts, event_id=event_id)

    async def text(self, text: str, ts: int | None = None, *, event_id: str | None = None) -> str:
        return await self.send(
            "text", text.encode("utf-8"), "text/plain;charset=utf-8", ts, event_id=event_id
        )

    # -- the wire -----------------------------------------------------------------------

    async def send(
        self,
        modality: Modality,
        body: bytes,
        content_type: str,
        ts: int | None = None,
        *,
        event_id: str | None = None,
    ) -> str:
        """Publish one event as it is (``ts``: ns since the epoch, default now); returns its id."""
        self._raise_failures()
        if self._resend:
            await self._send_again()
        nc = self._nc
        if nc is None:
            raise AutoGLMError("use the Producer inside 'async with'")
        if self.claim_check or len(body) > nc.max_payload - _HEADER_ROOM:
            ref = await put_payload(self._js, self.bucket, body, content_type, max_payload=nc.max_payload)
            self.claims.append((len(body), ref.name))
            body, content_type = ref.encode(), OBJECT_REF
        eid = event_id or f"{self._ids}-{modality[0]}{self._seq}"
        hdrs = encode_headers(
            time.time_ns() if ts is None else ts,
            content_type,
            event_id=eid,
            seq=self._seq,
            traceparent=self.traceparent,
        )
        subject = self.subjects.input(self.source, modality)
        self._seq += 1
        if self.durable is False and time.monotonic() - self._probed > RECHECK_S:
            self.durable = None  # a stream may store the inputs by now (the engine started after us)
        if self.durable is None:
            await self._first(subject, body, hdrs)
        elif self.durable:
            self._unconfirmed[eid] = (subject, body, hdrs)
            try:
                ack = await self._js.publish_async(subject, body, headers=hdrs, wait_stall=self.ack_timeout)
            except TooManyStalledMsgsError as exc:
                raise TransportError(
                    f"{self.max_in_flight} events waited {self.ack_timeout:g} s for the input stream's PubAck"
                ) from exc
            self._acks[ack] = eid
            ack.add_done_callback(lambda fut, eid=eid: self._acked(fut, eid))
        else:
            await nc.publish(subject, body, headers=hdrs)
        self.sent[modality] += 1
        return eid

    async def _first(self, subject: str, body: bytes, hdrs: dict[str, str]) -> None:
        """The first event, after asking the server which mode it is in.

        A stream that stores the subject means durable mode. Asking first
        matters in core mode: the engine's plain subscription receives a
        JetStream publish as a request it never answers, so probing by
        publishing would wait out the whole ack timeout. A user that may not
        ask (``--secure``'s producer) probes by publishing after all."""
        self._probed = time.monotonic()
        try:
            await self._js.find_stream_name_by_subject(subject)
        except (NotFoundError, NoRespondersError) as exc:  # no stream for it, or no JetStream at all
            if self.require_durable:
                raise TransportError(
                    f"no stream stores {subject} (durable=True): is the engine running?"
                ) from exc
            self.durable = False
            await self._nc.publish(subject, body, headers=hdrs)
            return
        except Exception:  # not allowed to ask: the publish below finds out
            pass
        try:
            ack = await self._js.publish(subject, body, headers=hdrs, timeout=self.ack_timeout)
        except (NoRespondersError, NatsTimeoutError) as exc:
            if self.require_durable:
                raise TransportError(f"no PubAck for {subject} (durable=True): no stream stores it") from exc
            self.durable = False  # no stream: core mode (the plain publish reached whoever listens)
            return
        except APIError as exc:
            raise TransportError(f"the input stream refused {subject}: {exc}") from exc
        self.durable = True
        if ack.duplicate:
            self.duplicates.append(hdrs["Nats-Msg-Id"])

    def _acked(self, fut: asyncio.Future[Any], eid: str) -> None:
        self._acks.pop(fut, None)
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, APIError) and not isinstance(exc, ServiceUnavailableError):
            self._unconfirmed.pop(eid, None)  # the stream refused it: sending it again changes nothing
            self._failed.append(f"{eid}: {exc or type(exc).__name__}")
        elif exc is not None:  # no responders, a timeout: the server went away; send it again
            self._resend.append(eid)
        else:
            self._unconfirmed.pop(eid, None)
            if fut.result().duplicate:
                self.duplicates.append(eid)

    async def _send_again(self) -> None:
        """Send the events whose PubAck failed again, each under its own id,
        until stored or :attr:`resend_s` has passed; then name those left."""
        ids, self._resend = self._resend, []
        deadline = time.monotonic() + self.resend_s
        left = []
        for eid in ids:
            entry = self._unconfirmed.get(eid)
            if entry is None:
                continue
            subject, body, hdrs = entry
            delay = 0.1
            while True:
                try:
                    ack = await self._js.publish(subject, body, headers=hdrs, timeout=self.ack_timeout)
                except APIError as exc:
                    if isinstance(exc, ServiceUnavailableError) and time.monotonic() < deadline:
                        await asyncio.sleep(delay)
                        continue
                    self._failed.append(f"{eid}: {exc}")
                    break
                except Exception:  # the server is still away
                    if time.monotonic() >= deadline:
                        left.append(eid)
                        break
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)
                    continue
                self.resent += 1
                if ack.duplicate:
                    self.duplicates.append(eid)
                break
            self._unconfirmed.pop(eid, None)
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise TransportError(
                f"{len(left)} event(s) not stored after {self.resend_s:g} s of retries: {shown}"
            )

    def _raise_failures(self) -> None:
        if self._failed:
            first, more = self._failed[0], len(self._failed) - 1
            raise TransportError(
                f"the input stream refused {first}" + (f" (and {more} more)" if more else "")
            )

    @property
    def claim_checked(self) -> int:
        """How many payloads went by claim check."""
        return len(self.claims)

    @property
    def in_flight(self) -> int:
        """Events sent but not yet acknowledged by the input stream (durable mode)."""
        return len(self._acks)

    async def flush(self) -> None:
        """Wait until every event is stored (durable) or has reached the server (core)."""
        if self._acks:
            _, pending = await asyncio.wait(set(self._acks), timeout=self.ack_timeout)
            for fut in pending:  # no PubAck in time: sent again below, under the same id
                eid = self._acks.pop(fut)
                fut.cancel()
                self._resend.append(eid)
        if self._resend:
            await self._send_again()
        if self._nc is not None:
            await self._nc.flush()
        self._raise_failures()
