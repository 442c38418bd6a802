"""OpenTelemetry spans for events and fused windows, continuing the producer's trace.

A producer that sends a W3C ``traceparent`` header gets, in the same trace:

    producer span (theirs)
    ├── autoglm.event   one per event: arrival -> features ready (CONSUMER)
    └── autoglm.window  the fused frame: first arrival -> result published
        ├── autoglm.align   first arrival -> window closed
        └── autoglm.glm     the model call, when there was one

and the result carries ``traceparent = 00-<trace>-<window span>-<flags>`` so
whoever consumes it continues the same trace. An event whose producer trace
differs from the window's (several producers in one window) keeps its own
parent and links to the window span. A window with no producer trace starts
one whose id is the record's ``trace_id`` (derived from the window, so a
rebuilt window keeps it).

Spans are made after the fact, when the frame is published, from times the
aligner already keeps: nothing is added to the per-event hot path, and with
tracing off (the default) nothing here runs at all. Our own TracerProvider,
not the global one, so embedding the engine never changes the host's tracing.
FastStream's OpenTelemetry middleware is not used: the hot path bypasses
FastStream's per-message machinery (see engine/runtime/engine.py).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from typing import IO, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from engine.config.models import TracingConfig
from engine.contracts.records import Result
from engine.contracts.types import FusedFrame

#: Standard OTLP variables; either one turns the exporter on.
OTLP_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROPAGATOR = TraceContextTextMapPropagator()


def new_traceparent() -> str:
    """A fresh sampled W3C trace context, for producers that have none."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def context_of(traceparent: str | None) -> Context | None:
    return _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None


def traceparent_of(span: trace.Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class _WindowIds(RandomIdGenerator):
    """Random ids, except that the next root trace id can be chosen: a window
    without a producer trace gets the record's derived ``trace_id``."""

    def __init__(self) -> None:
        self.next_trace_id: int | None = None

    def generate_trace_id(self) -> int:
        chosen, self.next_trace_id = self.next_trace_id, None
        return chosen if chosen else super().generate_trace_id()


class JsonLinesExporter(SpanExporter):
    """One span per line as OTLP-ish JSON, for a trace without a collector."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            self.out.write(span.to_json(indent=None) + "\n")
        self.out.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.out.close()


def _exporters(config: TracingConfig, env: Mapping[str, str]) -> list[SpanExporter]:
    out: list[SpanExporter] = []
    endpoint = config.endpoint or env.get(OTLP_ENV[0]) or env.get(OTLP_ENV[1])
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if not config.endpoint and not env.get(OTLP_ENV[0]):
            endpoint = endpoint.rstrip("/") + "/v1/traces"  # the base-URL variable, per the OTLP spec
        out.append(OTLPSpanExporter(endpoint=endpoint, timeout=config.export_timeout_s))
    if config.file:
        out.append(JsonLinesExporter(open(config.file, "a", encoding="utf-8")))  # noqa: SIM115 (closed on shutdown)
    return out


class Tracing:
    """Makes the spans of each published frame; off when nothing would export them."""

    def __init__(
        self,
        config: TracingConfig,
        *,
        exporters: Sequence[SpanExporter] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        if exporters is None:
            exporters = _exporters(config, os.environ if env is None else env)
        found = list(exporters)
        self.enabled = bool(found)
        self._ids = _WindowIds()
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer | None = None
        if self.enabled:
            self._provider = TracerProvider(
                resource=Resource.create({"service.name": config.service_name}),
                sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
                id_generator=self._ids,
            )
            for exporter in found:
                batcher = BatchSpanProcessor(exporter, max_queue_size=config.max_queue)
                self._provider.add_span_processor(batcher)
            self._tracer = self._provider.get_tracer("autoglm.engine")

    @property
    def tracer(self) -> trace.Tracer | None:
        return self._tracer

    def frame_spans(
        self, frame: FusedFrame, record: Result | Mapping[str, Any], result_id: str, now: int
    ) -> str | None:
        """Record the spans of one published frame; returns the result's ``traceparent``.
        ``record`` is the :class:`Result` (or its dict form, while the engine builds dicts)."""
        tracer = self._tracer
        if tracer is None:
            return frame.traceparent
        if isinstance(record, Result):
            trace_id, glm = record.trace_id, dict(record.glm)
        else:
            trace_id, glm = record["trace_id"], record.get("glm") or {}
        parent = context_of(frame.traceparent)
        if parent is None:
            self._ids.next_trace_id = int(trace_id, 16)
        window = tracer.start_span(
            "autoglm.window",
            context=parent,
            kind=SpanKind.INTERNAL,
            start_time=frame.first_arrival_ns,
            attributes={
                "autoglm.source": frame.source,
                "autoglm.window.start_ns": frame.start_ns,
                "autoglm.window.end_ns": frame.end_ns,
                "autoglm.result_id": result_id,
                "autoglm.missing": list(frame.missing),
                "autoglm.events": sum(len(f.event_ids) for f in frame.modalities.values()),
                "autoglm.glm.backend": str(glm.get("backend", "none")),
            },
        )
        self._ids.next_trace_id = None
        here = trace.set_span_in_context(window)
        if glm.get("skipped"):
            window.set_attribute("autoglm.glm.skipped", str(glm["skipped"]))
        if glm.get("error"):
            window.set_status(trace.Status(trace.StatusCode.ERROR, str(glm["error"])[:200]))
        link = [Link(window.get_span_context())]
        for mod, fused in frame.modalities.items():
            for i, eid in enumerate(fused.event_ids):
                own = fused.traceparents[i] if i < len(fused.traceparents) else None
                # Under the producer's span when it sent one (linked to the window),
                # else under the window.
                span = tracer.start_span(
                    "autoglm.event",
                    context=context_of(own) if own else here,
                    kind=SpanKind.CONSUMER,
                    links=link if own else None,
                    start_time=fused.arrivals[i] if i < len(fused.arrivals) else frame.first_arrival_ns,
                    attributes={
                        "messaging.system": "nats",
                        "autoglm.source": frame.source,
                        "autoglm.modality": mod,
                        "autoglm.event_id": eid,
                        "autoglm.event.ts_ns": fused.timestamps[i],
                    },
                )
                span.end(end_time=fused.done[i] if i < len(fused.done) and fused.done[i] else frame.closed_ns)
        tracer.start_span("autoglm.align", context=here, start_time=frame.first_arrival_ns).end(
            end_time=frame.closed_ns
        )
        glm_ms = glm.get("latency_ms")
        if isinstance(glm_ms, int | float) and glm_ms > 0:
            start = max(frame.closed_ns, now - int(glm_ms * 1e6))
            tracer.start_span("autoglm.glm", context=here, start_time=start).end(end_time=now)
        window.end(end_time=now)
        return traceparent_of(window)

    def shutdown(self) -> None:
        """Export what is buffered (bounded by the exporters' timeouts) and stop."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None
            self._tracer = None
