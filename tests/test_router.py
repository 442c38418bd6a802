from __future__ import annotations

from collections.abc import Sequence

import pytest

from engine.config.models import RouteConfig
from engine.contracts.errors import EventRejected, ProcessorError
from engine.contracts.types import ContentType, Features, InputEvent
from engine.pipeline.batcher import Batcher
from engine.pipeline.router import RateLimiter, Route, Router, subject_matches

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
