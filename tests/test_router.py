from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from engine.config.models import RouteConfig
from engine.contracts.errors import EventRejected, ProcessorError
from engine.contracts.plugins import ProcessorSpec
from engine.contracts.types import ContentType, Features, InputEvent
from engine.pipeline.batcher import Batcher
from engine.pipeline.router import SHADOW_QUEUE, RateLimiter, Route, Router, subject_matches
from engine.runtime.build import build_route
from tests.test_variants import NAMES, SCALED, _events

MS = 1_000_000


def ev(subject: str = "autoglm.in.cam.text", payload: bytes = b"ok", eid: str = "e") -> InputEvent:
    _, _, source, modality = subject.split(".")
    return InputEvent(subject, source, modality, 0, ContentType("text/plain"), payload, eid)  # type: ignore[arg-type]


class Picky:
    """Rejects payloads that say 'bad'; optionally returns too few outputs."""

    modality = "text"

    def __init__(self, short: bool = False) -> None:
        self.short = short
        self.batches: list[int] = []

    def prepare(self, event: InputEvent) -> bytes:
        if event.payload == b"bad":
            raise EventRejected("decode_error", "bad payload")
        if event.payload == b"crash":
            raise ZeroDivisionError("decoder bug")
        return event.payload

    def run(self, items: Sequence[bytes]) -> list[Features]:
        self.batches.append(len(items))
        out = [Features("text", text=i.decode()) for i in items]
        return out[:-1] if self.short else out


def route(proc: Picky, subject: str | None = None) -> Route:
    cfg = RouteConfig(modality="text", processor="passthrough", subject=subject)
    return Route("r", cfg, proc, Batcher(max_batch_size=8, max_wait_ns=0, max_queue=8))  # type: ignore[arg-type]


def test_subject_patterns() -> None:
    assert subject_matches("a.*.c", "a.b.c")
    assert not subject_matches("a.*.c", "a.b.d")
    assert subject_matches("a.>", "a.b.c")
    assert not subject_matches("a.>", "a")
    assert not subject_matches("a.b", "a.b.c")


def test_a_bad_event_never_poisons_its_batch() -> None:
    proc = Picky()
    out = route(proc).process(
        [ev(payload=b"one"), ev(payload=b"bad"), ev(payload=b"crash"), ev(payload=b"two")]
    )
    assert [o.text if isinstance(o, Features) else o.reason for o in out] == [
        "one",
        "decode_error",
        "decode_error",
        "two",
    ]
    assert "ZeroDivisionError: decoder bug" in str(out[2])
    assert proc.batches == [2]  # the good ones still ran as one batch


def test_wrong_output_count_is_a_processor_error() -> None:
    with pytest.raises(ProcessorError, match="returned 1 outputs for 2 inputs"):
        route(Picky(short=True)).process([ev(payload=b"a"), ev(payload=b"b")])


def test_router_first_match_and_no_route() -> None:
    special = route(Picky(), subject="autoglm.in.vip.text")
    general = route(Picky())
    router = Router([special, general])
    assert router.route_for(ev("autoglm.in.vip.text")) is special
    assert router.route_for(ev("autoglm.in.cam.text")) is general
    with pytest.raises(EventRejected) as info:
        Router([special]).route_for(ev("autoglm.in.cam.text"))
    assert info.value.reason == "no_route"


def test_rate_limiter_caps_by_event_time_and_tolerates_jitter() -> None:
    lim = RateLimiter(30)
    step = 1_000_000_000 // 30
    # 30 fps with +-5 ms jitter: every frame passes.
    jitter = [0, 5, -5, 3, -2, 4, -4, 0] * 10
    assert all(lim.allow("cam", i * step + j * MS) for i, j in enumerate(jitter))
    # 60 fps: half of them are skipped, and the long-run rate stays at 30/s.
    lim60 = RateLimiter(30)
    kept = sum(lim60.allow("cam", i * step // 2) for i in range(600))
    assert 295 <= kept <= 301
    # Sources are independent.
    assert lim60.allow("other", 0)


# -- variants and shadows: one arm's trouble is its own ----------------------------------------


def _ab(use_processor: Callable[[ProcessorSpec], None], *extra: dict[str, Any]) -> Route:
    use_processor(SCALED)
    rc = RouteConfig.model_validate({
        "modality": "text", "processor": "test-scaled", "experiment": "e",
        "variants": [{"name": "a", "params": {"factor": 1}}, {"name": "b", "params": {"factor": 2}}, *extra],
    })  # fmt: skip
    return build_route(rc, "r")


class PluginAbort(BaseException):
    """A plugin's own BaseException (not the process being stopped)."""


def test_a_broken_variant_rejects_only_its_own_events(use_processor: Callable[[ProcessorSpec], None]) -> None:
    route = _ab(use_processor)
    by = {v.name: v for v in route.variants}
    by["b"].processor.run = lambda items: []  # type: ignore[method-assign]  # too few features
    events = _events(NAMES[:40])
    outcomes = route.process(events)
    for ev_, o in zip(events, outcomes, strict=True):
        if route.variant_of(ev_.source).name == "a":
            assert isinstance(o, Features) and o.stats["value"] == 1
        else:
            assert isinstance(o, EventRejected) and o.reason == "processor_error" and "'b'" in o.message
    assert by["a"].events > 0 and by["a"].errors == 0 and by["b"].errors > 0


def test_live_outcomes_never_wait_on_a_shadow(use_processor: Callable[[ProcessorSpec], None]) -> None:
    route = _ab(use_processor, {"name": "s", "shadow": True, "params": {"factor": 3}})
    shadow = route.variants[2]
    gate = threading.Event()
    run = shadow.processor.run

    def held(items: Sequence[bytes]) -> list[Features]:
        gate.wait(10)  # (inline, process() would return only after this gave up)
        return run(items)

    shadow.processor.run = held  # type: ignore[method-assign]
    try:
        outcomes = route.process(_events(NAMES[:4]))
        assert all(isinstance(o, Features) for o in outcomes)
        assert not route.shadows_done(0)  # the shadow is still held while the live results are out
        for _ in range(SHADOW_QUEUE):  # one running, the queue fills, the last batch is dropped
            route.process(_events(NAMES[:4]))
        assert route.shadow_dropped == 1 and shadow.errors == 4
    finally:
        gate.set()
    assert route.shadows_done(10)
    assert shadow.events == shadow.compared == 4 * SHADOW_QUEUE
    route.close()


def test_a_plugins_baseexception_fails_neither_the_live_batch_nor_the_engine(
    use_processor: Callable[[ProcessorSpec], None],
) -> None:
    route = _ab(use_processor, {"name": "s", "shadow": True})

    def boom(items: Sequence[bytes]) -> list[Features]:
        raise PluginAbort("shadow")

    route.variants[2].processor.run = boom  # type: ignore[method-assign]
    outcomes = route.process(_events(NAMES[:4]))
    assert all(isinstance(o, Features) for o in outcomes)
    assert route.shadows_done(10) and route.variants[2].errors == 4
    # In a live arm it is that arm's processor_error, not an escape past every ``except Exception``.
    route.variants[0].processor.run = boom  # type: ignore[method-assign]
    route.variants[1].processor.prepare = lambda event: (_ for _ in ()).throw(PluginAbort("decode"))  # type: ignore[method-assign]
    outcomes = route.process(_events(NAMES[:40]))
    assert all(isinstance(o, EventRejected) for o in outcomes)
    reasons = {(route.variant_of(n).name, o.reason) for n, o in zip(NAMES[:40], outcomes, strict=True)}  # type: ignore[union-attr]
    assert reasons == {("a", "processor_error"), ("b", "decode_error")}
    single = build_route(RouteConfig.model_validate({"modality": "text", "processor": "test-scaled"}), "one")
    single.processor.run = boom  # type: ignore[method-assign]
    with pytest.raises(ProcessorError, match="PluginAbort: shadow"):
        single.process(_events(["cam"]))  # the driver rejects the batch as processor_error
    route.close()
