"""engine/transport/streams.py against a real server."""

from __future__ import annotations

from typing import Any

from nats.js.api import RetentionPolicy, StreamConfig

from engine.transport.streams import Slot, replay_point


async def test_the_replay_point_is_read_again_when_the_oldest_input_goes_under_it(
    nc: Any, prefix: str
) -> None:
    """A killed engine's last acks can reach the server after its successor read
    the stream: the oldest input is gone by the time it is fetched. The start
    reads the stream again instead of failing ('no message found')."""
    js = nc.jetstream()
    stream = f"{prefix.upper()}_IN"
    subjects = [f"{prefix}.in.>"]
    await js.add_stream(StreamConfig(name=stream, subjects=subjects, retention=RetentionPolicy.WORK_QUEUE))
    for i in range(3):
        await js.publish(f"{prefix}.in.cam.text", b"x", headers={"Nats-Msg-Id": f"e{i}"})
    real, calls = js.stream_info, []

    async def acked_under_us(*args: Any, **kw: Any) -> Any:
        info = await real(*args, **kw)
        calls.append(info.state.first_seq)
        if len(calls) == 1:
            await js.delete_msg(stream, 1)  # what the late ack does to a work queue
        return info

    js.stream_info = acked_under_us
    when, replayed_from = await replay_point(js, stream, Slot("0", "nobody", subjects[0]))
    second = await js.get_msg(stream, seq=2)
    assert calls[0] == 1 and when == second.time and replayed_from is None  # no consumer yet: kept as is
