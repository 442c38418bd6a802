"""The typed records: the bytes they make are the bytes the engine always sent,
and every message a real engine publishes validates against the committed
AsyncAPI document (with a validator shown to refuse what breaks the contract)."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import orjson
import pytest
from jsonschema import Draft7Validator
from pydantic import ValidationError

from engine.config.models import GLMConfig
from engine.contracts.errors import REASONS
from engine.contracts.records import (
    FrameRecord,
    GlmBackend,
    Latency,
    Reason,
    Rejection,
    Result,
    frame_record,
)
from engine.contracts.types import FusedFrame, ModalityFusion
from engine.runtime.engine import Engine
from tests.conftest import make_config, send

ROOT = Path(__file__).resolve().parent.parent
DOC = json.loads((ROOT / "docs" / "asyncapi.json").read_text())
MS = 1_000_000
T = 1_764_000_000_000_000_000
LAT: Latency = {"process": 1.25, "align": 100.5, "glm": 0.0, "event_to_result": 130.125}


def frame(**kw: Any) -> FusedFrame:
    fused = ModalityFusion(
        event_ids=("i1", "i2"),
        timestamps=(T, T + MS),
        summary={"count": 2, "embedding_dim": 512, "brightness": 0.41234, "labels": ["person"]},
    )
    audio = ModalityFusion(
        event_ids=("a1",), timestamps=(T,), summary={"count": 1, "mfcc_mean": [1.5, -2.25], "texts": ["hé"]}
    )
    fields: dict[str, Any] = {
        "source": "cam",
        "start_ns": T,
        "end_ns": T + 100 * MS,
        "modalities": {"image": fused, "audio": audio},
        "missing": ("text",),
        "traceparent": None,
        "first_arrival_ns": T,
        "closed_ns": T + 200 * MS,
    }
    return FusedFrame(**{**fields, **kw})


# -- the records themselves ------------------------------------------------------------------


@pytest.mark.parametrize("skipped", [{}, {"rate_limited": ("r1", "r2"), "missing_dropped": ("m1",)}])
def test_records_serialize_to_the_bytes_the_engine_sent_as_dicts(skipped: dict[str, Any]) -> None:
    f = frame(skipped=skipped)
    part = FrameRecord.from_frame(f)
    assert part.to_bytes() == orjson.dumps(frame_record(f))  # what replay writes
    glm = {"backend": "openai", "model": "glm-4", "latency_ms": 812.5}
    result = Result.of(f, prompt="Source cam", answer="a person", glm=glm, latency_ms=LAT)  # type: ignore[arg-type]
    old = frame_record(f)  # the engine's dict, extended the way the GLM stage and send_result do
    old.update(prompt="Source cam", answer="a person", glm=glm)
    old["latency_ms"] = LAT
    assert result.to_bytes() == orjson.dumps(old)
    assert ("skipped" in orjson.loads(result.to_bytes())) == bool(skipped)
    # pydantic agrees: its own serializer writes the same bytes, and reading them back
    # gives the same record (the trusted construction built a valid one).
    assert result.model_dump_json().encode() == result.to_bytes()
    assert Result.model_validate_json(result.to_bytes()).to_bytes() == result.to_bytes()


def test_records_are_frozen_and_refuse_what_the_contract_does_not_allow() -> None:
    result = Result.of(frame(), prompt=None, answer=None, glm={"backend": "none"}, latency_ms=LAT)
    with pytest.raises(ValidationError):
        result.answer = "changed"  # type: ignore[misc]
    good = orjson.loads(result.to_bytes())
    for broken in (
        {**good, "prompt": 123},
        {**good, "glm": {"backend": "none", "model": "x"}},  # no variant has model without latency
        {**good, "skipped": None},  # left out when there is none, never null
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "latency_ms"},
    ):
        with pytest.raises(ValidationError):
            Result.model_validate(broken)
    with pytest.raises(ValidationError):
        Rejection(
            subject="p.in.cam.text", source="cam", modality="text", event_id=None, timestamp_ns=None,
            reason="made_up", message="m", rejected_ns=1,
        )  # fmt: skip


def test_the_literals_match_their_sources() -> None:
    assert set(get_args(Reason)) == REASONS
    assert get_args(GlmBackend) == get_args(GLMConfig.model_fields["backend"].annotation)


# -- real messages against the committed document ----------------------------------------------


def _deref(ref: str) -> Any:
    node: Any = DOC
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _payload_ref(channel: str) -> str:
    [message] = DOC["channels"][channel]["messages"].values()
    while "$ref" in message:
        message = _deref(message["$ref"])
    return str(message["payload"]["$ref"])


def validator(channel: str) -> Draft7Validator:
    """The committed document's schema for one channel's payload (AsyncAPI 3.0's
    schema format is a superset of JSON Schema draft 7)."""
    for schema in DOC["components"]["schemas"].values():
        Draft7Validator.check_schema(schema)
    return Draft7Validator({"$ref": _payload_ref(channel), "components": DOC["components"]})


class Wire:
    """Every message on the document's output channels, raw, by channel."""

    OUTPUTS = ("result", "rejected", "late")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.got: dict[str, list[tuple[str, bytes]]] = {ch: [] for ch in self.OUTPUTS}
        self._arrived = asyncio.Event()

    def address(self, channel: str) -> str:
        return str(DOC["channels"][channel]["address"]).replace("autoglm.", f"{self.prefix}.", 1)

    async def subscribe(self, nc: Any) -> None:
        for channel in self.OUTPUTS:

            async def keep(msg: Any, channel: str = channel) -> None:
                self.got[channel].append((msg.subject, msg.data))
                self._arrived.set()

            await nc.subscribe(self.address(channel).replace("{source}", "*"), cb=keep)
        await nc.flush()

    def bodies(self, channel: str) -> list[dict[str, Any]]:
        return [orjson.loads(data) for _, data in self.got[channel]]

    async def wait(self, done: Callable[[Wire], object], what: str, timeout: float = 15.0) -> None:
        """Until ``done`` holds over what arrived (re-checked as each message arrives)."""
        try:
            async with asyncio.timeout(timeout):
                while not done(self):
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; got {self.got}") from None

    def check(self) -> int:
        """Validate every message; return how many there were."""
        n = 0
        for channel, messages in self.got.items():
            check = validator(channel)
            pattern = re.escape(self.address(channel)).replace(r"\{source\}", r"[A-Za-z0-9_-]{1,64}|_")
            for subject, data in messages:
                assert re.fullmatch(pattern, subject), (channel, subject)
                errors = [e.message for e in check.iter_errors(orjson.loads(data))]
                assert not errors, (channel, subject, errors, data)
                # ... and the typed record reads it and writes back the very same bytes
                model = Result if channel == "result" else Rejection
                assert model.model_validate_json(data).to_bytes() == data
                n += 1
        return n


async def test_every_message_a_real_engine_publishes_validates_against_the_document(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """One engine calls a real chat server (answered, failed), drops windows
    without an image (results of skipped events only), sends a too_late event
    to ``late`` and bad events to the DLQ."""
    from tests.chat_server import ChatServer

    def behaviour(n: int, body: dict[str, Any]) -> tuple[str, Any]:
        content = body["messages"][-1]["content"]
        text = content if isinstance(content, str) else content[0]["text"]
        return ("status", 500) if "Source fail" in text else ("ok", f"answer {n}")

    wire = Wire(prefix)
    await wire.subscribe(nc)
    async with ChatServer(behaviour) as srv:
        cfg = make_config(
            prefix,
            glm={"backend": "openai", "base_url": srv.url, "model": "glm-4", "retries": 0},
            aligner={"late_to": "late", "require": ["image"], "on_missing": "drop"},
        )
        engine = Engine(cfg)
        await engine.start(nats_url)
        t = time.time_ns() - 10**9
        for source, mod in [("ok", "image"), ("ok", "text"), ("fail", "image"), ("drop", "text")]:
            await send(nc, prefix, source, mod, b"abc", t, event_id=f"{source}-{mod}")
        # A later event seals ok's first window (the watermark passes it), so one
        # more in that window is too_late, at once and whatever the timing.
        await send(nc, prefix, "ok", "text", b"abc", t + 500 * MS, event_id="ok-later")
        await send(nc, prefix, "ok", "image", b"abc", t, event_id="ok-too-late")
        await send(nc, prefix, "ok", "text", b"x", t, content_type="video/mp4", event_id="bad-ct")
        await nc.publish(f"{prefix}.in.c$m.text", b"x", headers={"AutoGLM-Timestamp": str(t)})
        await nc.publish(f"{prefix}.in.ok.text", b"x", headers={"Content-Type": "text/plain"})
        await nc.publish(
            f"{prefix}.in.ok.text", b"x", headers={"Content-Type": "text/plain", "AutoGLM-Timestamp": "soon"}
        )
        await wire.wait(
            lambda w: (len(w.got["result"]), len(w.got["rejected"]), len(w.got["late"])) == (4, 4, 1),
            "four results, four rejections, one late",
        )
        await engine.stop()
    assert wire.check() == 9
    results = wire.bodies("result")
    fused = {",".join(sorted(i for ids in r["events"].values() for i in ids)): r["glm"] for r in results}
    assert set(fused["ok-image,ok-text"]) == {"backend", "model", "latency_ms"}  # answered
    assert "error" in fused["fail-image"]  # failed
    dropped = {
        tuple(r["skipped"]["missing_dropped"]): (r["glm"], r["prompt"]) for r in results if not r["events"]
    }
    no_call = ({"backend": "openai"}, None)
    assert dropped == {("drop-text",): no_call, ("ok-later",): no_call}  # only skipped events: no call
    reasons = {(r["source"], r["reason"], r["timestamp_ns"]) for r in wire.bodies("rejected")}
    assert reasons == {
        ("ok", "unsupported_content_type", str(t)),
        (None, "bad_subject", str(t)),
        ("ok", "missing_timestamp", None),
        ("ok", "bad_timestamp", "soon"),
    }
    assert [r["reason"] for r in wire.bodies("late")] == ["too_late"]


async def test_call_free_results_validate_too(nc: Any, nats_url: str, prefix: str) -> None:
    """backend none, on_change, no prompt: a result sent on, then one skipped as no_change."""
    wire = Wire(prefix)
    await wire.subscribe(nc)
    glm = {"backend": "none", "trigger": "on_change", "include_prompt": False}
    engine = Engine(make_config(prefix, glm=glm))
    await engine.start(nats_url)
    t = time.time_ns() - 10**9
    for i in range(2):  # two windows with the same scene
        await send(nc, prefix, "cam", "text", b"same", t + i * 200 * MS, event_id=f"same-{i}")
    await wire.wait(lambda w: len(w.got["result"]) == 2, "two results")
    await engine.stop()
    assert wire.check() == 2
    first, second = wire.bodies("result")
    assert first["glm"] == {"backend": "none"} and first["prompt"] is None
    assert second["glm"]["skipped"] == "no_change" and isinstance(second["glm"]["score"], float)


def test_the_validator_refuses_what_breaks_the_contract() -> None:
    """The checks above could not pass by accident: the same validators refuse
    a wrong type, a missing field, an unknown field and an unknown variant."""
    good = orjson.loads(
        Result.of(
            frame(skipped={"stale": ("s1",)}),
            prompt="p",
            answer="a",
            glm={"backend": "hf", "model": "m", "latency_ms": 1.0},
            latency_ms=LAT,
        ).to_bytes()
    )
    results = validator("result")
    assert list(results.iter_errors(good)) == []
    broken: list[dict[str, Any]] = []
    for path, value in [
        (("prompt",), 123),
        (("window", "start_ns"), "1"),
        (("glm",), {"backend": "hf", "skipped": "bored"}),
        (("glm",), {"backend": "none", "model": "m"}),
        (("skipped",), None),
        (("skipped",), {"forgotten": ["x"]}),
        (("events",), {"video": ["x"]}),
        (("features", "image", "labels"), [None]),
        (("latency_ms", "total"), 1.0),
    ]:
        record = copy.deepcopy(good)
        *parents, leaf = path
        node = record
        for key in parents:
            node = node[key]
        node[leaf] = value
        broken.append(record)
    broken.append({k: v for k, v in good.items() if k != "result_id"})
    for record in broken:
        assert list(results.iter_errors(record)), record
    rejection = {
        "subject": "p.in.cam.text", "source": "cam", "modality": "text", "event_id": "e",
        "timestamp_ns": "1", "reason": "bad_header", "message": "m", "rejected_ns": 1,
    }  # fmt: skip
    for channel in ("rejected", "late"):
        check = validator(channel)
        assert list(check.iter_errors(rejection)) == []
        for bad in ({**rejection, "reason": "made_up"}, {**rejection, "rejected_ns": "1"}, {"subject": "x"}):
            assert list(check.iter_errors(bad)), bad
