"""OpenTelemetry: the producer's trace continues through the engine into the result."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from engine.config.models import TracingConfig
from engine.contracts.records import Result
from engine.contracts.types import FusedFrame, ModalityFusion
from engine.observe.tracing import Tracing, new_traceparent
from engine.runtime.engine import Engine
from tests.conftest import collect, make_config, send, spawn_engine

MS = 1_000_000


def ids(traceparent: str) -> tuple[int, int]:
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def run_traced(nc: Any, nats_url: str, prefix: str, events: list[tuple[str, str | None]]) -> Any:
    """Publish text events (id, traceparent) of one window; return (headers, record, spans)."""
    exporter = InMemorySpanExporter()
    out = await collect(nc, f"{prefix}.out.>")
    engine = Engine(make_config(prefix), tracing=Tracing(TracingConfig(), exporters=[exporter]))
    await engine.start(nats_url)
    ts = time.time_ns() // (100 * MS) * 100 * MS + 10 * MS  # all inside one 100 ms window
    for i, (eid, tp) in enumerate(events):
        await send(nc, prefix, "cam", "text", b"hi", ts + i * MS, event_id=eid, traceparent=tp)
    await nc.flush()
    await out.wait_for(1)
    await engine.stop()  # shuts the tracer down, which exports every span
    [(_, headers, record)] = out.items
    return headers, record, list(exporter.get_finished_spans())


async def test_producer_trace_continues_through_events_window_and_result(
    nc: Any, nats_url: str, prefix: str
) -> None:
    a, b = new_traceparent(), new_traceparent()
    sent = [("e1", a), ("e2", a), ("e3", b), ("e4", None)]
    headers, record, spans = await run_traced(nc, nats_url, prefix, sent)
    a_trace, a_span = ids(a)
    b_trace, b_span = ids(b)
    [window] = by_name(spans, "autoglm.window")
    assert window.context is not None and window.parent is not None
    # the window is a child of the producer span of its first event ...
    assert window.context.trace_id == a_trace and window.parent.span_id == a_span
    # ... and the result continues from the window span
    assert ids(headers["traceparent"]) == (a_trace, window.context.span_id)
    assert record["trace_id"] == f"{a_trace:032x}"
    events = {s.attributes["autoglm.event_id"]: s for s in by_name(spans, "autoglm.event") if s.attributes}
    assert set(events) == {"e1", "e2", "e3", "e4"}
    for eid in ("e1", "e2"):  # under their producer's span, linked to the window
        span = events[eid]
        assert span.parent is not None and span.parent.span_id == a_span
        assert [lk.context.span_id for lk in span.links] == [window.context.span_id]
    other = events["e3"]  # another producer's trace keeps its own parent
    assert other.context is not None and other.context.trace_id == b_trace
    assert other.parent is not None and other.parent.span_id == b_span
    untraced = events["e4"]  # no producer trace: under the window
    assert untraced.parent is not None and untraced.parent.span_id == window.context.span_id
    for span in events.values():
        assert span.start_time is not None and span.end_time is not None
        assert span.start_time <= span.end_time <= (window.end_time or 0)
    [align] = by_name(spans, "autoglm.align")
    assert align.parent is not None and align.parent.span_id == window.context.span_id


async def test_a_window_without_producer_trace_starts_one_named_by_its_record(
    nc: Any, nats_url: str, prefix: str
) -> None:
    headers, record, spans = await run_traced(nc, nats_url, prefix, [("e1", None)])
    [window] = by_name(spans, "autoglm.window")
    assert window.parent is None and window.context is not None
    assert f"{window.context.trace_id:032x}" == record["trace_id"] == headers["traceparent"].split("-")[1]


async def test_tracing_off_passes_the_producer_context_through(nc: Any, nats_url: str, prefix: str) -> None:
    out = await collect(nc, f"{prefix}.out.>")
    engine = Engine(make_config(prefix))
    assert not engine.tracing.enabled  # nothing configured: no provider, no spans
    await engine.start(nats_url)
    tp = new_traceparent()
    await send(nc, prefix, "cam", "text", b"hi", time.time_ns(), traceparent=tp)
    await nc.flush()
    await out.wait_for(1)
    await engine.stop()
    assert out.items[0][1]["traceparent"] == tp


class _Collector(BaseHTTPRequestHandler):
    """A loopback OTLP/HTTP receiver: keeps every exported span."""

    spans: ClassVar[list[Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                type(self).spans.extend(ss.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[Any]]]:
    _Collector.spans = []
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1/traces", _Collector.spans
    server.shutdown()


async def test_otlp_exporter_sends_the_engine_spans_of_a_producer_trace(
    nc: Any, nats_url: str, prefix: str, tmp_path: Path, otlp_receiver: tuple[str, list[Any]]
) -> None:
    endpoint, received = otlp_receiver
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\ndurable = false\n'
        f'[tracing]\nendpoint = "{endpoint}"\n'
        "[aligner]\nwindow_ms = 100\nidle_timeout_ms = 300\n"
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    out = await collect(nc, f"{prefix}.out.>")
    engine = await spawn_engine("--config", str(cfg), "--nats-url", nats_url)
    tp = new_traceparent()
    await send(nc, prefix, "cam", "text", b"hello", time.time_ns(), event_id="t1", traceparent=tp)
    await nc.flush()
    await out.wait_for(1)
    engine.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(engine.wait(), 30) == 0
    trace_id, span_id = ids(tp)
    mine = [s for s in received if int.from_bytes(s.trace_id, "big") == trace_id]
    names = sorted(s.name for s in mine)
    assert names == ["autoglm.align", "autoglm.event", "autoglm.window"], names
    window = next(s for s in mine if s.name == "autoglm.window")
    assert int.from_bytes(window.parent_span_id, "big") == span_id
    assert ids(out.items[0][1]["traceparent"]) == (trace_id, int.from_bytes(window.span_id, "big"))


def test_a_typed_result_makes_the_same_spans_as_its_dict_form() -> None:
    """frame_spans reads a :class:`Result` (what the engine will hand it) as it
    reads the dict the engine builds today: same trace, same attributes, same status."""
    t = 1_764_000_000_000_000_000
    fused = ModalityFusion(("e1",), (t,), {"count": 1}, arrivals=(t,), done=(t + MS,), traceparents=(None,))
    frame = FusedFrame("cam", t, t + 100 * MS, {"text": fused}, (), None, t, t + 2 * MS)
    latency = {"process": 1.0, "align": 2.0, "glm": 3.0, "event_to_result": 4.0}
    glm = {"backend": "openai", "model": "glm-4", "latency_ms": 3.0, "error": "HTTP 500"}
    result = Result.of(frame, prompt="p", answer=None, glm=glm, latency_ms=latency)  # type: ignore[arg-type]
    seen = []
    for record in (result, orjson.loads(result.to_bytes())):
        exporter = InMemorySpanExporter()
        tracing = Tracing(TracingConfig(), exporters=[exporter])
        traceparent = tracing.frame_spans(frame, record, result.result_id, t + 3 * MS)
        tracing.shutdown()
        [window] = by_name(list(exporter.get_finished_spans()), "autoglm.window")
        assert window.context is not None and f"{window.context.trace_id:032x}" == result.trace_id
        assert traceparent is not None  # span ids are random; the trace is the window's
        seen.append((ids(traceparent)[0], dict(window.attributes or {}), window.status.status_code))
    assert seen[0] == seen[1] and seen[0][2] == StatusCode.ERROR
