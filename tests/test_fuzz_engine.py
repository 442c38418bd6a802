"""Random header values through a running engine in durable mode.

The codec fuzz (test_fuzz.py) shows decode_event refuses cleanly; this one
shows the JetStream fetch loop survives whatever producers send — Unicode
digits in every number, junk parameters, odd traceparents, lower-case header
names — and that every message still ends in exactly one record.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.runtime.engine import Engine
from engine.wire.codec import encode_headers
from tests.conftest import collect, make_config

#: Characters that are digits to ``str.isdigit()`` but not to ``int()``, and ones that are to both.
ODD_DIGITS = "²³¹①⑳٣۴५০๓０９𝟘"


def numberish(valid: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(valid),
        st.text(alphabet=st.sampled_from("0123456789" + ODD_DIGITS), min_size=1, max_size=22),
        st.builds(lambda c, i: valid[:i] + c + valid[i:], st.sampled_from(ODD_DIGITS), st.integers(0, 19)),
        st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=30),
    )


@st.composite
def message_headers(draw: st.DrawFn, ts: int) -> dict[str, str]:
    h: dict[str, str] = {}
    names = ["AutoGLM-Timestamp", "Content-Type", "AutoGLM-Seq", "traceparent"]
    if draw(st.booleans()):
        names = [n.lower() for n in names]
    h[names[0]] = draw(numberish(str(ts)))
    mime = draw(
        st.sampled_from(
            [
                "text/plain",
                "text/plain;charset={}",
                "image/x-raw;format=bgr8;width={};height=1",
                "audio/pcm;rate={};channels=1;format=s16le",
                "audio/pcm;rate=16000;channels={};format=f32le",
            ]
        )
    )
    h[names[1]] = mime.format(draw(numberish("16"))) if "{}" in mime else mime
    if draw(st.booleans()):
        h[names[2]] = draw(numberish("7"))
    if draw(st.booleans()):
        h[names[3]] = draw(
            st.one_of(
                st.just("00-" + "0" * 32 + "-" + "0" * 16 + "-01"),
                st.just("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=60),
            )
        )
    return h


SUBJECT_MODALITY = {"text/": "text", "image/": "image", "audio/": "audio"}


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
async def test_the_durable_fetch_loop_survives_random_headers_and_accounts_for_each(
    nc: Any, nats_url: str, prefix: str, data: st.DataObject
) -> None:
    run = f"{prefix}f{time.monotonic_ns()}"[:40]
    out = await collect(nc, f"{run}.out.>")
    dlq = await collect(nc, f"{run}.dlq.>")
    engine = Engine(
        make_config(run, nats={"subject_prefix": run, "durable": True}, aligner={"idle_timeout_ms": 200})
    )
    await engine.start(nats_url)
    try:
        ts = time.time_ns()
        ids = set()
        for i in range(40):
            hdrs = data.draw(message_headers(ts))
            ct = next(v for k, v in hdrs.items() if k.lower() == "content-type")
            mod = next((m for p, m in SUBJECT_MODALITY.items() if ct.startswith(p)), "text")
            eid = f"fz-{i}"
            ids.add(eid)
            await nc.publish(f"{run}.in.cam.{mod}", b"x" * 16, headers={**hdrs, "Nats-Msg-Id": eid})
        # A well-formed event after them all: it comes out only if intake still runs.
        await nc.publish(
            f"{run}.in.cam.text", b"sentinel", headers=encode_headers(ts, "text/plain", event_id="fz-end")
        )
        ids.add("fz-end")
        await nc.flush()
        await out.wait_until(
            lambda: set(out.event_ids()) | {r["event_id"] for _, _, r in dlq.items} >= ids,
            "every message in a result or a DLQ record",
            timeout=30,
        )
        rejected = [r for _, _, r in dlq.items]
        fused = out.event_ids()
        assert sorted(fused + [r["event_id"] for r in rejected]) == sorted(ids), "one record each"
        assert not [r for r in rejected if r["reason"] == "internal_error"], rejected
        health = orjson.loads((await nc.request(f"{run}.svc.health", b"", timeout=2)).data)
        assert health["status"] == "ok" and engine.supervisor.failure is None
    finally:
        await engine.stop()
