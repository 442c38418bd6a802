"""A source's GLM state follows it to another worker: history and on_change's
last-sent frame in a KV bucket, read through on first sight, written behind."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from nats.js.errors import BucketNotFoundError

from engine.config.models import GLMConfig, NatsConfig
from engine.contracts.types import Features, FusedFrame, InputEvent, Modality, ModalityFusion
from engine.contracts.vocabulary import FeatureVocabulary, embedding_change
from engine.glm.memory import Memory
from engine.glm.prompts import Answer
from engine.glm.stage import GLMStage
from engine.glm.state import SourceState, decode, encode
from engine.glm.trigger import ChangeTrigger, Recalled
from engine.runtime.engine import Engine
from engine.runtime.memorykv import KVStateStore
from engine.runtime.server import EmbeddedServer
from engine.transport import partitions
from engine.transport.partitions import assignment
from engine.transport.streams import glm_bucket
from processors import registry
from processors.params import PassthroughParams
from tests.chat_server import ChatServer
from tests.conftest import collect, make_config, send, until

MS = 1_000_000
S = 1_000 * MS
WORDS = {"a red car": [1.0, 0.0, 0.0], "a blue bus": [0.0, 1.0, 0.0]}


@dataclass(frozen=True, slots=True)
class Captions(FeatureVocabulary):
    """A test processor's reading: a caption and its embedding; a change is the embedding's."""

    def change(self, before: ModalityFusion | None, now: ModalityFusion | None) -> float:
        return embedding_change(
            before.embedding if before is not None else None, now.embedding if now is not None else None
        )


CAPTIONS = Captions()


class Captioner:
    vocabulary = CAPTIONS

    def __init__(self, modality: Modality) -> None:
        self.modality: Modality = modality

    def prepare(self, event: InputEvent) -> str:
        return event.payload.decode()

    def run(self, items: Sequence[str]) -> list[Features]:
        return [
            Features(self.modality, embedding=np.array(WORDS[t], np.float32), text=t, vocabulary=CAPTIONS)
            for t in items
        ]


def make_captioner(params: PassthroughParams, modality: Modality, device: str, dtype: str) -> Captioner:
    return Captioner(modality)


@pytest.fixture
def captioner(monkeypatch: pytest.MonkeyPatch) -> str:
    spec = registry.ProcessorSpec(
        "test-captioner", None, PassthroughParams, "tests.test_glm_state:make_captioner"
    )
    monkeypatch.setitem(registry.REGISTRY, spec.name, spec)
    return spec.name


def frame(i: int, words: str, source: str = "cam") -> FusedFrame:
    mod = ModalityFusion(
        (f"e{i}",), (i * S,), {"count": 1, "texts": [words]}, np.array(WORDS[words], np.float32),
        vocabulary=CAPTIONS,
    )  # fmt: skip
    return FusedFrame(source, i * S, (i + 1) * S, {"text": mod}, (), None, 0, 0)


# -- the value ------------------------------------------------------------------------------


def test_a_state_read_back_decides_like_the_one_written() -> None:
    here = ChangeTrigger(0.3, 10 * S)
    assert here.decide(frame(0, "a red car")).send
    sent = here.snapshot_of("cam")
    assert sent is not None
    history = (Answer(0, S, "a red car parks"),)
    back = decode(encode(SourceState(history, sent)))
    assert back.history == history
    assert back.snapshot is not None and back.snapshot.recalled
    text = back.snapshot.modalities["text"]
    assert text.embedding is not None and text.embedding.dtype == np.float32
    assert text.embedding.tolist() == [1.0, 0.0, 0.0] and text.summary == {"count": 1, "texts": ["a red car"]}
    assert isinstance(text.vocabulary, Recalled)

    there = ChangeTrigger(0.3, 10 * S)
    there.restore("cam", back.snapshot)
    verdict = there.decide(frame(1, "a red car"))
    assert (verdict.send, verdict.why) == (False, "no_change")  # bound to the live vocabulary: compared
    assert there.snapshot_of("cam").modalities["text"].vocabulary is CAPTIONS  # type: ignore[union-attr]
    assert there.decide(frame(2, "a blue bus")).send

    # A vocabulary no live processor names any more reads as another processor's: a change.
    renamed = decode(encode(SourceState((), sent)).replace(b"Captions()", b"Gone()"))
    assert renamed.snapshot is not None
    elsewhere = ChangeTrigger(0.3, 10 * S)
    elsewhere.restore("cam", renamed.snapshot)
    assert elsewhere.decide(frame(1, "a red car")).send


@pytest.mark.parametrize("bad", [b"", b"[]", b'{"v": 99}', b'{"v": 1, "h": [[1]], "s": null}'])
def test_a_value_this_version_cannot_read_is_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        decode(bad)


# -- the write-behind queue --------------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of this test's own, to stall (SIGSTOP) without stalling the others."""
    server = EmbeddedServer(tmp_path / "nats")
    server.start()
    yield server
    assert server.process is not None
    with contextlib.suppress(ProcessLookupError):
        server.process.send_signal(signal.SIGCONT)
    server.stop()


def stopped(server: EmbeddedServer) -> bool:
    """The server's process is stopped (``T`` in /proc): a signal lands a moment after it is sent."""
    assert server.process is not None
    stat = Path(f"/proc/{server.process.pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "T"


async def test_writes_under_a_stalled_store_coalesce_and_drop_the_oldest_without_blocking(
    own_server: EmbeddedServer,
) -> None:
    nc = await nats.connect(own_server.url)
    try:
        config = NatsConfig(subject_prefix="stall")
        store = await KVStateStore.open(nc.jetstream(), config)
        trigger = ChangeTrigger(0.3, 10 * S)
        stage = GLMStage(GLMConfig(), lambda f, r: asyncio.sleep(0))
        memory = Memory(store, trigger=lambda: trigger, stage=lambda: stage, max_pending=3, timeout_s=10)
        sources = [f"cam{i}" for i in range(6)]
        for s in sources:
            memory.recall(s)
        await memory.settle()
        assert all(memory.knows(s) for s in sources) and memory.stats.loads == 6
        memory.start()

        assert own_server.process is not None
        own_server.process.send_signal(signal.SIGSTOP)  # every write from now on hangs
        await until(lambda: stopped(own_server), "the server to stop")
        trigger.decide(frame(0, "a red car", "cam0"))
        memory.changed("cam0")
        await until(lambda: memory.pending == 1 and not memory._dirty, "cam0's write under way")
        for i, s in enumerate(sources[1:], 1):
            trigger.decide(frame(i, "a red car", s))
            memory.changed(s)
            memory.changed(s)  # coalesced: one write, of the state as it stands then
        # cam1 and cam2 waited longest: dropped; the calls above returned at once
        assert memory.stats.dropped == 2 and list(memory._dirty) == ["cam3", "cam4", "cam5"]
        own_server.process.send_signal(signal.SIGCONT)
        await until(lambda: memory.pending == 0, "the writes to go through")
        assert memory.stats.writes == 4 and memory.stats.write_failures == 0

        kv = await nc.jetstream().key_value(glm_bucket(config))
        for i, s in enumerate(sources):
            if s in ("cam1", "cam2"):
                with pytest.raises(Exception, match="not found"):
                    await kv.get(s)
                continue
            state = decode((await kv.get(s)).value)
            assert state.snapshot is not None and state.snapshot.end_ns == (i + 1) * S

        # A read that cannot finish in time leaves its source starting afresh, counted.
        impatient = Memory(store, trigger=lambda: trigger, stage=lambda: stage, max_pending=3, timeout_s=0.2)
        own_server.process.send_signal(signal.SIGSTOP)
        await until(lambda: stopped(own_server), "the server to stop")
        impatient.recall("fresh")
        await impatient.settle()
        assert impatient.knows("fresh") and not impatient.loading and impatient.stats.load_failures == 1
        own_server.process.send_signal(signal.SIGCONT)
        await memory.close()
    finally:
        await nc.close()


async def test_a_worker_that_let_a_source_go_never_overwrites_its_new_owner(nc: Any, prefix: str) -> None:
    config = NatsConfig(subject_prefix=prefix, glm_state_ttl_s=600, glm_state_max_bytes=1 << 20)
    store = await KVStateStore.open(nc.jetstream(), config)
    bucket = (await nc.jetstream().stream_info(f"KV_{glm_bucket(config)}")).config
    assert (bucket.max_age, bucket.max_bytes, bucket.max_msgs_per_subject) == (600, 1 << 20, 1)
    assert getattr(bucket.discard, "value", bucket.discard) == "old"  # full: the longest unwritten go
    assert (await KVStateStore.open(nc.jetstream(), config)).kv is not None  # a second worker binds to it

    def worker() -> tuple[Memory, ChangeTrigger]:
        trigger = ChangeTrigger(0.3, 10 * S)
        stage = GLMStage(GLMConfig(), lambda f, r: asyncio.sleep(0))
        memory = Memory(store, trigger=lambda: trigger, stage=lambda: stage, max_pending=8, timeout_s=10)
        memory.start()
        return memory, trigger

    (a, a_trigger), (b, b_trigger) = worker(), worker()
    try:
        a.recall("cam")
        await a.settle()
        a_trigger.decide(frame(0, "a red car"))
        a.changed("cam")
        assert await a.written()
        assert a.leave(lambda s: True) == []  # handed over, nothing left to write
        a_trigger.forget(lambda s: True)
        b.recall("cam")
        await b.settle()
        assert b_trigger.decide(frame(1, "a blue bus")).send
        b.changed("cam")
        assert await b.written()
        a.changed("cam")  # a late answer on the worker that let cam go: fenced off
        assert await a.written()
        assert a.stats.conflicts == 1 and a.stats.writes == 1
        got = await store.read("cam")
        assert got is not None and decode(got[0]).snapshot.end_ns == 2 * S  # type: ignore[union-attr]
        # Back on a, which holds it now; b, which never let go, writes once more
        # (a lease lost while the server was away): a, the holder, writes over it.
        a.recall("cam")
        await a.settle()
        b.changed("cam")
        assert await b.written()
        assert a_trigger.decide(frame(2, "a red car")).send
        a.changed("cam")
        assert await a.written()
        assert a.stats.conflicts == 2 and a.stats.writes == 2
        got = await store.read("cam")
        assert got is not None and decode(got[0]).snapshot.end_ns == 3 * S  # type: ignore[union-attr]
    finally:
        await a.close()
        await b.close()


# -- two engines, one source -------------------------------------------------------------------


@pytest.mark.parametrize("move", ["stop", "handover"])
async def test_a_source_moved_to_another_engine_keeps_its_history_and_last_sent_frame(
    nc: Any, nats_url: str, prefix: str, captioner: str, monkeypatch: pytest.MonkeyPatch, move: str
) -> None:
    """``stop``: A stops and B, starting after, takes the partition over.
    ``handover``: B joins while A runs, and is the partition's rightful owner."""
    a_name = "worker-a"
    b_name = next(n for n in (f"worker-b{i}" for i in range(100)) if assignment(["0"], [a_name, n])["0"] == n)
    names = iter([a_name, b_name])
    monkeypatch.setattr(partitions, "worker_name", lambda: next(names))
    out = await collect(nc, f"{prefix}.out.>")
    async with ChatServer(lambda n, body: ("ok", f"answer-{n}")) as srv:
        cfg = make_config(
            prefix,
            nats={"subject_prefix": prefix, "durable": True, "lease_s": 1.0},
            routes=[{"modality": "text", "processor": captioner, "batch": {"max_batch_size": 1}}],
            glm={"backend": "openai", "base_url": srv.url, "model": "m", "retries": 0,
                 "trigger": "on_change", "change_threshold": 0.3, "history": 3,
                 "template": "{source}: {text} | earlier: {history}"},
        )  # fmt: skip
        first, second = Engine(cfg), Engine(cfg)
        t = (time.time_ns() // S - 5) * S

        async def window(i: int, words: str) -> dict[str, Any]:
            await send(
                nc, prefix, "cam", "text", words.encode(), t + i * 100 * MS + 10 * MS, event_id=f"e{i}"
            )
            await nc.flush()
            results = await out.wait_for(i + 1)
            return dict(results[i])

        await first.start(nats_url)
        try:
            assert "skipped" not in (await window(0, "a red car"))["glm"]
            assert (await window(1, "a red car"))["glm"]["skipped"] == "no_change"
            if move == "stop":
                await first.stop()
                await second.start(nats_url)
            else:
                await second.start(nats_url)
                await until(
                    lambda: second.transport is not None and second.transport.state().partitions == ("0",),
                    "the second engine to take the partition over",
                )
                assert first.transport is not None and first.transport.state().partitions == ()
            # B has never seen cam: the scene is unchanged since the frame A sent
            moved = await window(2, "a red car")
            assert moved["glm"]["skipped"] == "no_change", moved["glm"]
            changed = await window(3, "a blue bus")
        finally:
            await second.stop()
            await first.stop()
    assert changed["answer"] == "answer-1"
    prompts = [r["messages"][-1]["content"] for r in srv.requests]
    assert prompts == [
        "cam: a red car | earlier: none",
        f"cam: a blue bus | earlier: [{t}..{t + 100 * MS}] answer-0",  # A's answer, in B's prompt
    ]
    assert second.memory is not None and second.memory.stats.found == 1


async def test_core_mode_keeps_the_state_in_memory_and_makes_no_bucket(
    nc: Any, nats_url: str, prefix: str, captioner: str
) -> None:
    out = await collect(nc, f"{prefix}.out.>")
    cfg = make_config(
        prefix,
        nats={"subject_prefix": prefix, "durable": False},
        routes=[{"modality": "text", "processor": captioner, "batch": {"max_batch_size": 1}}],
        glm={"trigger": "on_change", "change_threshold": 0.3},
    )
    t = (time.time_ns() // S - 5) * S
    engine = Engine(cfg)
    await engine.start(nats_url)
    try:
        assert engine.memory is None and engine.driver is not None and engine.driver.memory is None
        for i, words in enumerate(["a red car", "a red car", "a blue bus"]):
            await send(
                nc, prefix, "cam", "text", words.encode(), t + i * 100 * MS + 10 * MS, event_id=f"e{i}"
            )
            await nc.flush()
            await out.wait_for(i + 1)
    finally:
        await engine.stop()
    skipped = [r["glm"].get("skipped") for r in await out.wait_for(3)]
    assert skipped == [None, "no_change", None]
    with pytest.raises(BucketNotFoundError):
        await nc.jetstream().key_value(glm_bucket(cfg.nats))
