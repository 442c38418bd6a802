"""A/B variants of a route: which source sees which, sticky and weighted; shadows
that never reach fusion or the GLM; results and metrics that say which."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict

from engine.config.models import RouteConfig, load_config
from engine.contracts.errors import ConfigError
from engine.contracts.plugins import ProcessorSpec
from engine.contracts.types import Features, InputEvent, Modality, ModelVersion
from engine.contracts.versions import config_version, identify, weights_version
from engine.pipeline.variants import Assignment, Variant, point
from engine.runtime.build import build_route
from engine.runtime.engine import Engine
from tests.conftest import ROOT, collect, make_config, send, until
from tests.test_metrics import scrape_when


class ScaledParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    factor: float = 1.0


class Scaled:
    """Features that say which params made them: ``value`` = factor, embedding (factor, 1)."""

    def __init__(self, params: ScaledParams, modality: Modality) -> None:
        self.modality, self.factor = modality, params.factor

    def prepare(self, event: InputEvent) -> bytes:
        return event.payload

    def run(self, items: Sequence[bytes]) -> list[Features]:
        emb = np.array([self.factor, 1.0], np.float32)
        return [Features(self.modality, embedding=emb, stats={"value": self.factor}) for _ in items]


def make_scaled(params: ScaledParams, modality: Modality, device: str, dtype: str) -> Scaled:
    return Scaled(params, modality)


SCALED = ProcessorSpec("test-scaled", None, ScaledParams, "tests.test_variants:make_scaled")


def variant(name: str, weight: float) -> Variant:
    return Variant(name, weight, Scaled(ScaledParams(), "text"), ModelVersion("p", "m", "v", name))


NAMES = [f"cam-{i}" for i in range(10_000)]


# -- assignment ------------------------------------------------------------------------------


def test_a_source_always_sees_the_same_variant_in_any_process() -> None:
    live = [variant("a", 1), variant("b", 1)]
    here = [Assignment("exp1", live).of(n).name for n in NAMES[:200]]
    assert here == [Assignment("exp1", live).of(n).name for n in NAMES[:200]]  # a fresh one, same answer
    code = (
        "from engine.pipeline.variants import Assignment, Variant\n"
        "live = [Variant(n, 1, None, None) for n in 'ab']\n"
        "print(''.join(Assignment('exp1', live).of(f'cam-{i}').name for i in range(200)))\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "random", "PYTHONPATH": str(ROOT)},
    ).stdout.strip()  # fmt: skip
    assert other == "".join(here)


def test_the_split_follows_the_weights_and_the_seed() -> None:
    counts = Counter(Assignment("exp1", [variant("a", 7), variant("b", 3)]).of(n).name for n in NAMES)
    assert abs(counts["a"] / len(NAMES) - 0.7) < 0.02, counts
    three = Counter(Assignment("exp1", [variant(x, 1) for x in "abc"]).of(n).name for n in NAMES)
    assert all(abs(three[x] / len(NAMES) - 1 / 3) < 0.02 for x in "abc"), three
    one = Assignment("exp1", [variant("a", 1), variant("b", 1)])
    two = Assignment("exp2", [variant("a", 1), variant("b", 1)])
    changed = sum(one.of(n).name != two.of(n).name for n in NAMES)
    assert 0.4 < changed / len(NAMES) < 0.6  # another experiment reshuffles, independently


def test_weights_near_the_float_maximum_still_split_by_their_ratio() -> None:
    def split(a: float, b: float) -> Counter[str]:
        return Counter(Assignment("exp1", [variant("a", a), variant("b", b)]).of(n).name for n in NAMES)

    huge = split(1e308, 1e308)
    assert abs(huge["a"] / len(NAMES) - 0.5) < 0.02, huge  # their sum is inf: inf / inf was NaN, all to b
    ratio = split(1.5e308, 0.5e308)
    assert abs(ratio["a"] / len(NAMES) - 0.75) < 0.02, ratio


def test_new_weights_move_only_the_sources_whose_bucket_changed() -> None:
    before = Assignment("exp1", [variant("a", 1), variant("b", 1)])  # a: [0, .5)
    after = Assignment("exp1", [variant("a", 2), variant("b", 3)])  # a: [0, .4)
    moved = {n for n in NAMES if before.of(n).name != after.of(n).name}
    assert all(before.of(n).name == "a" and after.of(n).name == "b" for n in moved)  # never b -> a
    assert moved == {n for n in NAMES if 0.4 <= point("exp1", n) < 0.5}
    assert abs(len(moved) / len(NAMES) - 0.1) < 0.02


def test_variant_config_is_checked() -> None:
    ok = {"modality": "text", "processor": "passthrough"}
    with pytest.raises(ConfigError, match="variant names must differ"):
        make_config("x", routes=[{**ok, "variants": [{"name": "a"}, {"name": "a"}]}])
    with pytest.raises(ConfigError, match="not a shadow and has a weight above 0"):
        make_config(
            "x", routes=[{**ok, "variants": [{"name": "a", "shadow": True}, {"name": "b", "weight": 0}]}]
        )
    with pytest.raises(ConfigError, match=r'routes\[0\].variants\[1\].processor = "nope": unknown processor'):
        make_config("x", routes=[{**ok, "variants": [{"name": "a"}, {"name": "b", "processor": "nope"}]}])
    for bad, said in (("inf", "Infinity"), ("nan", "NaN")):
        with pytest.raises(ConfigError, match=rf"routes\[0\].variants\[0\].weight = {said}: .*finite"):
            variants = [{"name": "a", "weight": float(bad)}, {"name": "b"}]
            make_config("x", routes=[{**ok, "variants": variants}])
    with pytest.raises(ConfigError, match=r"routes\[0\].variants\[0\].params.extra"):
        make_config("x", routes=[{**ok, "variants": [{"name": "a", "params": {"extra": 1}}]}])


# -- a route's batch ---------------------------------------------------------------------------


def _events(sources: Sequence[str]) -> list[InputEvent]:
    return [
        InputEvent(f"p.in.{s}.text", s, "text", i, None, b"x", f"e{i}")  # type: ignore[arg-type]
        for i, s in enumerate(sources)
    ]


def test_a_batch_runs_each_source_through_its_variant_and_shadows_beside_them(
    use_processor: Callable[[ProcessorSpec], None],
) -> None:
    use_processor(SCALED)
    rc = RouteConfig.model_validate({
        "modality": "text", "processor": "test-scaled", "experiment": "e",
        "variants": [{"name": "a", "params": {"factor": 1}},
                     {"name": "b", "weight": 3, "params": {"factor": 2}},
                     {"name": "s", "shadow": True, "params": {"factor": -1}}],
    })  # fmt: skip
    route = build_route(rc, "routes[0]")
    events = _events(NAMES[:300])
    outcomes = route.process(events)
    by = {v.name: v for v in route.variants}
    for ev, f in zip(events, outcomes, strict=True):
        assert isinstance(f, Features) and f.model is not None
        live = route.variant_of(ev.source)
        assert f.model is live.model and f.model.variant == live.name != "s"
        assert f.stats["value"] == {"a": 1, "b": 2}[live.name]  # never the shadow's features
    assert by["a"].events + by["b"].events == 300 and by["a"].errors == by["b"].errors == 0
    assert 0.15 < by["a"].events / 300 < 0.35
    shadow = by["s"]
    assert route.shadows_done(10)  # shadows run after the live outcomes are out
    assert shadow.events == shadow.compared == 300
    # (-1, 1) against (1, 1) is orthogonal: distance 1; against (2, 1): 1 + 1/sqrt(10)
    expected = by["a"].events * 1.0 + by["b"].events * (1 + 1 / np.sqrt(10))
    assert shadow.distance == pytest.approx(expected, rel=1e-5)
    versions = {v.name: v.model.version for v in route.variants}
    assert len(set(versions.values())) == 3  # other params, another version
    assert versions["a"] == config_version({"processor": "test-scaled", "params": {"factor": 1.0}})


def test_a_failing_shadow_costs_the_live_events_nothing(
    use_processor: Callable[[ProcessorSpec], None],
) -> None:
    use_processor(SCALED)
    rc = RouteConfig.model_validate({
        "modality": "text", "processor": "test-scaled",
        "variants": [{"name": "live"}, {"name": "s", "shadow": True}],
    })  # fmt: skip
    route = build_route(rc, "r")

    def boom(items: Sequence[bytes]) -> list[Features]:
        raise RuntimeError("shadow bug")

    route.variants[1].processor.run = boom  # type: ignore[method-assign]
    outcomes = route.process(_events(["a", "b"]))
    assert all(isinstance(o, Features) for o in outcomes)
    assert route.shadows_done(10)
    assert route.variants[1].errors == 2 and route.variants[0].events == 2


def test_a_model_version_is_the_hash_of_its_weight_files(tmp_path: Any) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    for d in ("one", "two"):
        (tmp_path / d / "w.bin").write_bytes(b"\x00" * 1000)

    class Loaded:
        model_name = "tiny"

        def __init__(self, folder: str) -> None:
            self.weight_files = (str(tmp_path / folder / "w.bin"),)

    a, b = identify("p", Loaded("one"), {"x": 1}), identify("p", Loaded("two"), {"x": 2})
    assert a.version == b.version == weights_version([tmp_path / "one" / "w.bin"])  # the bytes, not the path
    assert (a.processor, a.model) == ("p", "tiny") and a.version.startswith("sha256:")
    (tmp_path / "two" / "w.bin").write_bytes(b"\x00" * 999 + b"\x01")
    assert identify("p", Loaded("two"), {}).version != a.version
    assert identify("p", object(), {"x": 1}).version != identify("p", object(), {"x": 2}).version


# -- end to end ----------------------------------------------------------------------------


async def test_results_and_metrics_name_the_variant_and_the_shadow_never_reaches_the_glm(
    use_processor: Callable[[ProcessorSpec], None], nc: Any, nats_url: str, prefix: str
) -> None:
    use_processor(SCALED)
    route = {
        "modality": "text", "processor": "test-scaled", "experiment": "e2e",
        "variants": [{"name": "a", "params": {"factor": 1}}, {"name": "b", "params": {"factor": 2}},
                     {"name": "s", "shadow": True, "params": {"factor": 7}}],
    }  # fmt: skip
    cfg = make_config(prefix, routes=[route], metrics={"port": 0}, glm={"template": "{source}: {text}"})
    out = await collect(nc, f"{prefix}.out.>")
    engine = Engine(cfg)
    await engine.start(nats_url)
    sources = [f"cam{i}" for i in range(30)]
    try:
        now = time.time_ns()
        for s in sources:
            await send(nc, prefix, s, "text", b"hi", now, event_id=f"{s}-1")
        await out.wait_events({f"{s}-1" for s in sources})
        live = engine.pipeline.routes[0]
        key = ("text:test-scaled",)  # the route label: <modality>:<processor>
        versions = {v.name: v.model.version for v in live.variants}

        def done(m: Any) -> bool:
            live = sum(m.get(("autoglm_variant_events_total", labels[n]), 0) for n in ("a", "b"))
            return live == 30 and m.get(("autoglm_variant_events_total", labels["s"]), 0) == 30

        labels = {
            n: (("model", "test-scaled"), ("processor", "test-scaled"), ("route", key[0]),
                ("variant", n), ("version", versions[n]))
            for n in ("a", "b", "s")
        }  # fmt: skip
        m = await scrape_when(engine.metrics.port, done, "the variants' events")
    finally:
        await engine.stop()
    seen: Counter[str] = Counter()
    for _, _, body in out.items:
        model = body["models"]["text"]
        expected = live.variant_of(body["source"])
        assert model == {"processor": "test-scaled", "model": "test-scaled",
                         "version": expected.model.version, "variant": expected.name}  # fmt: skip
        assert body["features"]["text"]["value"] == {"a": 1.0, "b": 2.0}[expected.name]
        assert "value=7" not in body["prompt"]  # the shadow's features never reach the GLM
        seen[expected.name] += 1
    assert set(seen) == {"a", "b"}
    for n in ("a", "b"):
        assert m[("autoglm_variant_events_total", labels[n])] == seen[n]
    shadow = (("model", "test-scaled"), ("processor", "test-scaled"), ("route", key[0]),
              ("variant", "s"), ("version", versions["s"]))  # fmt: skip
    assert m[("autoglm_variant_events_total", shadow)] == 30
    assert m[("autoglm_shadow_compared_total", shadow)] == 30


async def test_autoglm_models_and_ab_report_show_each_variant(
    use_processor: Callable[[ProcessorSpec], None], nc: Any, nats_url: str, prefix: str, tmp_path: Any
) -> None:
    use_processor(SCALED)
    route = {
        "modality": "text", "processor": "test-scaled", "experiment": "report",
        "variants": [{"name": "a", "params": {"factor": 1}}, {"name": "b", "params": {"factor": 2}},
                     {"name": "s", "shadow": True, "params": {"factor": -1}}],
    }  # fmt: skip
    cfg = make_config(prefix, routes=[route], nats={"durable": True})
    out = await collect(nc, f"{prefix}.out.>")
    engine = Engine(cfg)
    await engine.start(nats_url)
    sources = [f"cam{i}" for i in range(20)]
    routing = tmp_path / "routing.toml"  # the report needs only the prefix (its stream's name)
    routing.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\n[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    try:
        now = time.time_ns()
        for s in sources:
            for k in range(2):
                await send(nc, prefix, s, "text", b"hi", now + k, event_id=f"{s}-{k}")
        await out.wait_events({f"{s}-{k}" for s in sources for k in range(2)})
        live = engine.pipeline.routes[0]
        await until(lambda: live.variants[2].events == 40, "the shadow's events")  # (run after the live ones)
        expected = Counter(live.variant_of(s).name for s in sources)
        cli = [sys.executable, "-m", "engine.tools.cli"]
        models, report = [
            await asyncio.to_thread(
                subprocess.run, [*cli, *args, "--nats-url", nats_url],
                cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
            )
            for args in (["models"], ["ab", "report", "--config", str(routing)])
        ]  # fmt: skip
    finally:
        await engine.stop()
    rows = [line.split() for line in models.stdout.splitlines() if line.startswith(prefix)]
    roles = (("a", "live"), ("b", "live"), ("s", "shadow"))
    assert {(r[1], r[2], r[3]) for r in rows} == {("text:test-scaled", n, role) for n, role in roles}
    versions = {v.name: v.model.version for v in live.variants}
    assert {r[2]: r[6] for r in rows} == versions
    arms = {line.split()[1]: line.split() for line in report.stdout.splitlines() if line.startswith("text ")}
    assert set(arms) == {n for n in expected}
    for n, count in expected.items():
        row = arms[n]
        assert row[2:5] == ["test-scaled", "test-scaled", versions[n]]
        assert (int(row[5]), int(row[6])) == (count, 2 * count)  # sources, events
    assert f"shadow text:test-scaled s (test-scaled/test-scaled {versions['s']}): 40 events" in report.stdout
    assert "mean cosine distance to live" in report.stdout


def _routing(prefix: str, a: int, b: int) -> str:
    return f"""
[nats]
subject_prefix = "{prefix}"
[aligner]
window_ms = 100
idle_timeout_ms = 300
[[routes]]
modality = "text"
processor = "test-scaled"
experiment = "rl"
variants = [{{ name = "a", weight = {a}, params = {{ factor = 1 }} }},
            {{ name = "b", weight = {b}, params = {{ factor = 2 }} }}]
"""


async def test_a_reload_to_new_weights_moves_only_the_sources_whose_bucket_changed(
    use_processor: Callable[[ProcessorSpec], None], nc: Any, nats_url: str, prefix: str, tmp_path: Any
) -> None:
    use_processor(SCALED)
    path = tmp_path / "routing.toml"
    path.write_text(_routing(prefix, 1, 1))
    out = await collect(nc, f"{prefix}.out.>")
    engine = Engine(load_config(path, env={}), config_path=path)
    await engine.start(nats_url)
    sources = [f"cam{i}" for i in range(300)]

    async def round_of(k: int) -> dict[str, str]:
        ts = time.time_ns()
        for s in sources:
            await send(nc, prefix, s, "text", b"hi", ts, event_id=f"{s}-{k}")
        await out.wait_events({f"{s}-{k}" for s in sources})
        return {
            body["source"]: body["models"]["text"]["variant"]
            for _, _, body in out.items
            if any(e.endswith(f"-{k}") for e in body["events"].get("text", ()))
        }

    try:
        before = await round_of(0)
        old = {v.name: v for v in engine.pipeline.routes[0].variants}
        path.write_text(_routing(prefix, 2, 3))
        report = await engine.reload()
        assert report["ok"], report
        new = {v.name: v for v in engine.pipeline.routes[0].variants}
        after = await round_of(1)
    finally:
        await engine.stop()
    assert all(new[n].processor is old[n].processor for n in "ab")  # the same models, not loaded again
    assert all(new[n].model == old[n].model for n in "ab")
    moved = {s for s in sources if before[s] != after[s]}
    assert moved and all(before[s] == "a" and after[s] == "b" for s in moved)
    assert moved == {s for s in sources if 0.4 <= point("rl", s) < 0.5}


def test_each_variant_runs_the_routes_also_processors_beside_its_own() -> None:
    """``[[routes.also]]`` and ``variants`` together: every variant is an
    ensemble of its own processor and the route's ``also`` ones, versioned
    by its own (so the two arms differ by their params, not by the words)."""
    from engine.config.models import RouteConfig
    from engine.pipeline.ensemble import Ensemble
    from engine.runtime.build import build_route

    rc = RouteConfig.model_validate(
        {
            "modality": "audio",
            "processor": "mfcc",
            "device": "cpu",
            "also": [{"processor": "vad"}],
            "variants": [{"name": "a"}, {"name": "b", "params": {"n_mfcc": 20}}],
        }
    )
    route = build_route(rc, "audio")
    try:
        a, b = route.variants
        assert isinstance(a.processor, Ensemble) and isinstance(b.processor, Ensemble)
        assert a.processor.names == b.processor.names == ("mfcc", "vad")
        assert (a.model.processor, b.model.processor) == ("mfcc", "mfcc")
        assert a.model.version != b.model.version and (a.model.variant, b.model.variant) == ("a", "b")
    finally:
        route.close()
