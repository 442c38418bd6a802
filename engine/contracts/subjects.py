"""Every NATS subject the engine and its tools use, built and parsed in one place.

Under one prefix (``autoglm`` unless configured)::

    <prefix>.in.<source>.<modality>   an input event (raw payload + headers)
    <prefix>.part.<p>.<source>.<modality>
                                      the same event stored in partition ``p`` (the
                                      input stream's subject transform, or the
                                      server's mapping in core mode; producers never
                                      publish here)
    <prefix>.out.<source>             a result record
    <prefix>.dlq.<source>             a rejection record (``<prefix>.dlq._``: bad subject)
    <prefix>.late.<source>            a ``too_late`` rejection with ``late_to = "late"``
    <prefix>.svc.health|config        service endpoints of the engine of this prefix
    <prefix>.svc.reload.<id>          one engine's reload endpoint
    $SRV.PING|INFO|STATS.autoglm      NATS service discovery (micro protocol)
    $O.<bucket>.C|M.<token>           the claim-check Object Store's chunks and metadata

Callers never format these themselves: they hold a :class:`Subjects` and ask
it. Partitioning inputs across workers (``nats.partitions``) is a server-side
transform of ``in.<source>.<modality>`` into ``part.<p>.<source>.<modality>``
with ``{{partition(N,1)}}``: producers are unchanged, :meth:`parse_input`
reads both, and :func:`partition_of` finds a source's partition the way the
server does.

Plain string work, no regex on the hot path: ``result()`` runs once per
published record and ``parse_input()`` once per new subject (the codec
caches parsed subjects).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from engine.contracts.errors import EventRejected
from engine.contracts.types import MODALITIES, Modality

#: A source token: what ``<source>`` may be in every subject above.
SOURCE_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: A subject prefix: dot-separated tokens (``autoglm``, ``edge.site1``).
PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
#: The DLQ token of a record whose subject named no valid source.
NO_SOURCE: Final = "_"
#: The NATS micro service name every engine registers under.
SERVICE_NAME: Final = "autoglm"
#: Every service-discovery subject (``$SRV.PING``, ``$SRV.INFO.autoglm``...).
SRV_ALL: Final = "$SRV.>"

SrvVerb = Literal["PING", "INFO", "STATS"]


@dataclass(frozen=True, slots=True)
class InputSubject:
    """What an input subject names."""

    source: str
    modality: Modality


def srv(verb: SrvVerb, name: str = SERVICE_NAME) -> str:
    """``$SRV.<verb>.<name>``: ask every engine on this NATS (discovery)."""
    return f"$SRV.{verb}.{name}"


def object_chunks(bucket: str, token: str = ">") -> str:
    """``$O.<bucket>.C.<token>``: an Object Store bucket's chunks (``token`` is
    an object's nuid, ``>`` for the bucket's stream, ``*`` in a permission)."""
    return f"$O.{bucket}.C.{token}"


def object_meta(bucket: str, token: str = ">") -> str:
    """``$O.<bucket>.M.<token>``: an Object Store bucket's metadata (``token`` is
    an object's base64url name; ``>``/``*`` as for :func:`object_chunks`)."""
    return f"$O.{bucket}.M.{token}"


def partition_of(source: str, partitions: int) -> int:
    """The partition nats-server's ``{{partition(N,1)}}`` puts ``source`` in:
    FNV-1a (32 bit) of the token, modulo ``partitions``."""
    h = 0x811C9DC5
    for byte in source.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def valid_source(source: str) -> bool:
    """Whether ``source`` may stand as the ``<source>`` token of a subject."""
    return SOURCE_RE.fullmatch(source) is not None


@dataclass(frozen=True, slots=True)
class Subjects:
    """The subjects of one prefix. Cheap to make; equal prefixes are equal."""

    prefix: str = "autoglm"

    def __post_init__(self) -> None:
        if not PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(f"subject prefix {self.prefix!r}: must be dot-separated tokens of [A-Za-z0-9_-]")

    # -- one message's subject ----------------------------------------------------------

    def input(self, source: str, modality: Modality) -> str:
        """``<prefix>.in.<source>.<modality>``: where a producer publishes one event."""
        return self.input_pattern(source, modality)

    def result(self, source: str) -> str:
        """``<prefix>.out.<source>``: where a window's result record goes."""
        return f"{self.prefix}.out.{source}"

    def dlq(self, source: str | None) -> str:
        """``<prefix>.dlq.<source>``, or ``<prefix>.dlq._`` when the event's
        subject named no valid source (the record still says what it was)."""
        token = source if source and SOURCE_RE.fullmatch(source) else NO_SOURCE
        return f"{self.prefix}.dlq.{token}"

    def late(self, source: str) -> str:
        """``<prefix>.late.<source>``: ``too_late`` records when ``aligner.late_to = "late"``."""
        return f"{self.prefix}.late.{source}"

    # -- addresses with placeholders: documents and messages for people -----------------

    def input_pattern(self, source: str = "{source}", modality: str = "{modality}") -> str:
        """The input address with placeholders: AsyncAPI's ``{source}`` by
        default, or any other spelling (``<source>`` for people)."""
        return f"{self.prefix}.in.{source}.{modality}"

    def result_pattern(self, source: str = "{source}") -> str:
        """The result address with a placeholder (see :meth:`input_pattern`)."""
        return self.result(source)

    def dlq_pattern(self, source: str = "{source}") -> str:
        """The DLQ address with a placeholder (see :meth:`input_pattern`)."""
        return f"{self.prefix}.dlq.{source}"

    def late_pattern(self, source: str = "{source}") -> str:
        """The late address with a placeholder (see :meth:`input_pattern`)."""
        return self.late(source)

    def service(self, endpoint: Literal["health", "config"]) -> str:
        """``<prefix>.svc.<endpoint>``: the engine of this prefix answers there."""
        return f"{self.prefix}.svc.{endpoint}"

    def reload(self, service_id: str) -> str:
        """``<prefix>.svc.reload.<id>``: one engine's reload endpoint."""
        return f"{self.prefix}.svc.reload.{service_id}"

    # -- wildcards: streams, subscriptions, permissions ------------------------------------

    @property
    def inputs(self) -> str:
        """``<prefix>.in.>``: every input event (the input stream, a live subscription)."""
        return f"{self.prefix}.in.>"

    def partition(self, p: int | str) -> str:
        """``<prefix>.part.<p>.>``: every input stored in partition ``p``
        (``*``: in any partition)."""
        return f"{self.prefix}.part.{p}.>"

    def partition_transform(self, partitions: int) -> tuple[str, str]:
        """The subject transform that spreads sources over ``partitions``:
        ``(source, destination)`` for a stream's ``subject_transform`` or a
        server's ``mappings``. Subjects of any other shape keep their subject
        (and are refused by whoever owns the ``in.>`` rest)."""
        return (
            f"{self.prefix}.in.*.*",
            f"{self.prefix}.part.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}",
        )

    @property
    def results(self) -> str:
        """``<prefix>.out.>``: every result."""
        return f"{self.prefix}.out.>"

    @property
    def rejections(self) -> str:
        """``<prefix>.dlq.>``: every rejection record."""
        return f"{self.prefix}.dlq.>"

    @property
    def lates(self) -> str:
        """``<prefix>.late.>``: every ``too_late`` record sent apart."""
        return f"{self.prefix}.late.>"

    @property
    def outputs(self) -> tuple[str, str, str]:
        """What the engine publishes (the results stream's subjects): out, dlq, late."""
        return (self.results, self.rejections, self.lates)

    @property
    def services(self) -> str:
        """``<prefix>.svc.>``: every service endpoint of this prefix."""
        return f"{self.prefix}.svc.>"

    @property
    def everything(self) -> str:
        """``<prefix>.>``: all of the above."""
        return f"{self.prefix}.>"

    # -- parsing --------------------------------------------------------------------------

    def parse_input(self, subject: str) -> InputSubject:
        """Split ``<prefix>.in.<source>.<modality>`` (or the partitioned
        ``<prefix>.part.<p>.<source>.<modality>``); raise ``bad_subject`` otherwise."""
        head = self.prefix + ".in."
        if subject.startswith(self.prefix + ".part."):
            # Only the server writes these (a transform of a valid in.<source>.<modality>).
            rest = subject[len(self.prefix) + 6 :].split(".", 1)
            if len(rest) == 2 and rest[0].isdigit():
                subject = head + rest[1]
        if not subject.startswith(head):
            raise EventRejected("bad_subject", f"subject {subject!r} does not start with {head!r}")
        parts = subject[len(head) :].split(".")
        if len(parts) != 2:
            raise EventRejected("bad_subject", f"subject {subject!r} is not {head}<source>.<modality>")
        source, modality = parts
        if not SOURCE_RE.fullmatch(source):
            raise EventRejected(
                "bad_subject",
                f"source {source!r} in subject {subject!r} must be 1-64 characters of [A-Za-z0-9_-]",
            )
        if modality not in MODALITIES:
            raise EventRejected(
                "bad_subject",
                f"modality {modality!r} in subject {subject!r} is not one of {', '.join(MODALITIES)}",
            )
        return InputSubject(source, modality)

    def input_or_none(self, subject: str) -> InputSubject | None:
        """What a subject that may not parse names; ``None`` when it does not
        (a rejection record then carries ``source``/``modality`` null)."""
        try:
            return self.parse_input(subject)
        except EventRejected:
            return None

    def source_of(self, subject: str) -> str | None:
        """Best-effort source of an input subject, for DLQ routing."""
        where = self.input_or_none(subject)
        return where.source if where is not None else None

    def modality_of(self, subject: str) -> Modality | None:
        """Best-effort modality of an input subject (``None`` when it does not parse)."""
        where = self.input_or_none(subject)
        return where.modality if where is not None else None
