"""The results consumer and ``autoglm tail`` against a running engine: live
subscriptions, the results stream, and a durable consumer that resumes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from engine.contracts.errors import AutoGLMError
from engine.contracts.records import Rejection, Result
from engine.runtime.engine import Engine
from engine.sources.producer import Producer
from engine.sources.results import Record, Results
from tests.conftest import eventually, make_config, send, stored
from tests.test_cli import run_cli

SECOND = 1_000_000_000


async def take(results: Results, n: int, timeout: float = 20.0) -> list[Record]:
    async def read() -> list[Record]:
        got: list[Record] = []
        async for record in results:
            got.append(record)
            if len(got) == n:
                break
        return got

    return await asyncio.wait_for(read(), timeout)


async def test_live_results_and_rejections_come_typed(nats_url: str, nc: Any, prefix: str) -> None:
    engine = Engine(make_config(prefix, nats={"durable": False}))
    await engine.start(nats_url)
    try:
        async with Results(nats_url, sources=["live"], prefix=prefix, dlq=True) as results:
            async with Producer(nats_url, source="live", prefix=prefix) as p:
                eid = await p.text("hello")
            await send(nc, prefix, "live", "text", b"\xff broken", 1, event_id="bad")  # ts 1: before 2000
            got = await take(results, 2)
    finally:
        await engine.stop()
    [result] = [r for r in got if isinstance(r, Result)]
    [rejection] = [r for r in got if isinstance(r, Rejection)]
    assert result.source == "live" and result.events == {"text": [eid]}
    assert rejection.event_id == "bad" and rejection.reason == "bad_timestamp"


async def _windows(nats_url: str, prefix: str, source: str, n: int) -> None:
    """``n`` text events 200 ms apart, so each is a 100 ms window of its own."""
    start = time.time_ns() - 10 * SECOND
    async with Producer(nats_url, source=source, prefix=prefix) as p:
        for i in range(n):
            await p.text(f"event {i}", ts=start + i * SECOND // 5)


async def test_a_restarted_durable_consumer_resumes_without_gaps_or_repeats(
    nats_url: str, nc: Any, prefix: str
) -> None:
    engine = Engine(make_config(prefix, nats={"durable": True}))
    await engine.start(nats_url)
    try:
        await _windows(nats_url, prefix, "dur", 8)
        subject = f"{prefix}.out.dur"

        async def all_stored() -> list[str]:
            records = [r for _, r in await stored(nc, subject)]
            events = sum(len(r["events"].get("text", [])) for r in records)
            return [r["result_id"] for r in records] if events == 8 else []

        every = await eventually(all_stored, "results for all 8 events")
        opts: dict[str, Any] = {"sources": ["dur"], "prefix": prefix, "durable": "reader1"}
        async with Results(nats_url, from_start=True, **opts) as results:
            first = await take(results, 3)
        async with Results(nats_url, **opts) as results:  # a restart: from where it left off
            rest = await take(results, len(every) - 3)
        ids = [r.result_id for r in first + rest]
        assert ids == every  # in order, none missing, none twice
        async with Results(nats_url, **opts) as results:  # and nothing more after the end
            assert results.durable == "reader1"
            more = await asyncio.gather(asyncio.wait_for(take(results, 1), 1.0), return_exceptions=True)
            assert isinstance(more[0], TimeoutError)
    finally:
        await engine.stop()


async def test_tail_prints_a_line_per_window_or_json(nats_url: str, nc: Any, prefix: str) -> None:
    engine = Engine(make_config(prefix, nats={"durable": True}))
    await engine.start(nats_url)
    try:
        await _windows(nats_url, prefix, "tl", 3)
        await send(nc, prefix, "tl", "text", b"\xff", 5, event_id="tl-bad")  # a DLQ record: bad timestamp

        async def three() -> bool:
            return len(await stored(nc, f"{prefix}.out.tl")) >= 3

        await eventually(three, "three results")
        common = ("tail", "--nats-url", nats_url, "--prefix", prefix, "--source", "tl", "--from-start")
        code, out, err = await run_cli(*common, "--dlq", "--count", "4")
        assert code == 0, err
        lines = out.splitlines()
        assert len(lines) == 4
        assert (
            sum(
                line.startswith("tl  ") and "text 1" in line and "missing image,audio" in line
                for line in lines
            )
            == 3
        )
        assert any(line.startswith("tl  DLQ bad_timestamp  tl-bad: ") for line in lines)
        code, out, err = await run_cli(*common, "--json", "--count", "3")
        assert code == 0, err
        records = [Result.model_validate(orjson.loads(line)) for line in out.splitlines()]
        assert [r.source for r in records] == ["tl"] * 3
        since = (
            "tail",
            "--nats-url",
            nats_url,
            "--prefix",
            prefix,
            "--source",
            "tl",
            "--json",
            "--count",
            "3",
        )
        code, again, err = await run_cli(*since, "--since", "1h")  # the stream from an hour ago: the same
        assert code == 0 and again == out, err
    finally:
        await engine.stop()


async def test_tail_in_core_mode_without_a_stream_says_so(nats_url: str, prefix: str) -> None:
    code, _, err = await run_cli("tail", "--nats-url", nats_url, "--prefix", prefix, "--from-start")
    assert code == 1 and "no results stream" in err and "Traceback" not in err


class HandlerFailed(Exception):
    pass


async def test_a_record_whose_handler_raised_is_handed_back_not_acked(
    nats_url: str, nc: Any, prefix: str
) -> None:
    """Leaving ``async with Results`` on an exception (the handler crashed, or
    ``autoglm tail | head -1`` closed the pipe mid-print): the record it was
    handling is not acknowledged, so the durable consumer gives it again."""
    engine = Engine(make_config(prefix, nats={"durable": True}))
    await engine.start(nats_url)
    try:
        await _windows(nats_url, prefix, "dur", 4)

        async def all_stored() -> list[str]:
            records = [r for _, r in await stored(nc, f"{prefix}.out.dur")]
            events = sum(len(r["events"].get("text", [])) for r in records)
            return [r["result_id"] for r in records] if events == 4 else []

        every = await eventually(all_stored, "results")
        opts: dict[str, Any] = {"sources": ["dur"], "prefix": prefix, "durable": "r1"}
        crashed_on = []
        try:
            async with Results(nats_url, from_start=True, **opts) as results:
                async for record in results:
                    crashed_on.append(record.result_id)
                    raise HandlerFailed
        except HandlerFailed:
            pass
        async with Results(nats_url, **opts) as results:
            again = [r.result_id for r in await take(results, len(every))]
        assert crashed_on[0] == again[0] and sorted(again) == sorted(every)
    finally:
        await engine.stop()


async def test_a_named_consumer_asked_for_other_sources_says_so(nats_url: str, nc: Any, prefix: str) -> None:
    """A durable consumer reads what it was made for: asking it for other
    sources is refused with its name and what it reads, never answered with
    the old sources' records."""
    engine = Engine(make_config(prefix, nats={"durable": True}))
    await engine.start(nats_url)
    try:
        await _windows(nats_url, prefix, "alpha", 2)
        await eventually(lambda: stored(nc, f"{prefix}.out.alpha"), "alpha's results")
        async with Results(nats_url, sources=["alpha"], prefix=prefix, durable="rd", from_start=True) as r:
            await take(r, 1)
        try:
            async with Results(nats_url, sources=["beta"], prefix=prefix, durable="rd") as r:
                await take(r, 1, timeout=2.0)
        except AutoGLMError as exc:
            assert (
                "'rd' reads" in str(exc)
                and f"{prefix}.out.alpha" in str(exc)
                and "nats consumer rm" in str(exc)
            )
        else:
            raise AssertionError("a consumer of alpha was used to read beta")
    finally:
        await engine.stop()


async def test_tail_shows_a_producers_control_characters_escaped(nats_url: str, nc: Any, prefix: str) -> None:
    """An event id (or message, answer) with terminal escape sequences in it
    is printed escaped: a producer cannot retitle, clear or recolour the
    operator's terminal."""
    from engine.tools.tail import line

    engine = Engine(make_config(prefix, nats={"durable": False}))
    await engine.start(nats_url)
    try:
        async with Results(nats_url, sources=["cam"], prefix=prefix, dlq=True) as results:
            evil = "\x1b]0;pwned\x07\x1b[2J\x1b[31mFAKE ALERT"
            await send(nc, prefix, "cam", "text", b"hi", 1, event_id=evil)
            [rejection] = await take(results, 1)
    finally:
        await engine.stop()
    shown = line(rejection)
    assert not any(not c.isprintable() for c in shown), repr(shown)
    assert "\\x1b]0;pwned\\x07" in shown
