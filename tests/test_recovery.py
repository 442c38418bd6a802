"""What a start learns from the last run (engine/transport/recovery.py): the
crash guard's culprit is recorded as poison once and never processed."""

from __future__ import annotations

import time
from typing import Any

from engine.runtime.engine import Engine
from engine.transport.streams import state_bucket
from engine.wire.codec import encode_headers
from tests.conftest import collect, make_config, stored
from tests.test_hardening import durable

MS = 1_000_000


async def test_a_crash_guard_culprit_is_poisoned_and_never_handed_in(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """The consumer may deliver the culprit before its poison record is stored
    and the input deleted: that copy must be ended with the record, not fused."""
    cfg = make_config(prefix, nats=durable(prefix, max_deliver=3))
    first = Engine(cfg)
    await first.start(nats_url)
    await first.stop()
    js = nc.jetstream()
    t = time.time_ns() - 10**9
    for i in range(10):
        headers = encode_headers(t + i * 50 * MS, "text/plain", event_id=f"cam-{i}")
        await js.publish(f"{prefix}.in.cam.text", b"fine", headers=headers)
    # As a previous run leaves it when input 6 (cam-5) took the process down while in hand.
    kv = await js.key_value(state_bucket(cfg.nats))
    await kv.put(f"{cfg.nats.consumer}.inflight", b"6")
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    engine = Engine(cfg)
    await engine.start(nats_url)
    await dlq.wait_for(1)
    await out.wait_until(lambda: len(set(out.event_ids())) >= 9, "the other nine events", timeout=20)
    await engine.idle()
    await engine.flush_windows()
    await engine.stop()
    fused = [e for _, r in await stored(nc, f"{prefix}.out.>") for g in r["events"].values() for e in g]
    poisoned = [r["event_id"] for _, r in await stored(nc, f"{prefix}.dlq.>")]
    assert poisoned == ["cam-5"]
    assert sorted(fused) == sorted(f"cam-{i}" for i in range(10) if i != 5)
    info = await js.consumer_info(f"{prefix.upper()}_IN", cfg.nats.consumer)
    assert info.num_ack_pending == 0 and info.num_pending == 0
