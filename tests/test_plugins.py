"""Processor plugins found through entry points: the installed example, refusals, a route over a real server.

The example plugin (``examples/plugin-sharpness``) is really installed: pip
builds it into a folder of its own (``--target``, no dependencies, no build
isolation), which the test then puts on ``sys.path`` (``PYTHONPATH`` for a
process), as an installed package would be. The refused plugins are
distributions written by hand (a ``.dist-info`` with ``METADATA`` and
``entry_points.txt``, and the module it names): what importlib.metadata
reads from any installed package.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from engine.config.models import parse_config
from engine.contracts import plugins
from engine.contracts.errors import ConfigError
from engine.runtime.engine import Engine
from tests.conftest import ROOT, collect, make_config, send

EXAMPLE = ROOT / "examples" / "plugin-sharpness"


def _env(*paths: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), str(ROOT)])}


@pytest.fixture(scope="module")
def sharpness_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``examples/plugin-sharpness`` installed into a folder of its own."""
    work = tmp_path_factory.mktemp("sharpness")
    shutil.copytree(EXAMPLE, work / "src")  # pip builds in the source tree: not in ours
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(site), str(work / "src")],
        check=True,
    )  # fmt: skip
    return site


def _dist(site: Path, package: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    info = site / f"{package.replace('-', '_')}-0.3.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.3.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[autoglm.processors]\n{lines}")
    for name, code in modules.items():
        (site / f"{name}.py").write_text(code)


SPEC = """
from engine.contracts.plugins import ProcessorSpec
from processors.params import PassthroughParams
spec = ProcessorSpec({name!r}, None, PassthroughParams, "processors.passthrough:create", api={api})
"""


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three plugins the engine must refuse, one good one beside them."""
    site = tmp_path_factory.mktemp("bad") / "site"
    site.mkdir()
    _dist(site, "autoglm-oldapi", {"oldapi": "p18_oldapi:spec"},
          {"p18_oldapi": SPEC.format(name="oldapi", api=0)})  # fmt: skip
    _dist(site, "autoglm-twin-a", {"twin": "p18_twin_a:spec"},
          {"p18_twin_a": SPEC.format(name="twin", api=1)})  # fmt: skip
    _dist(site, "autoglm-twin-b", {"twin": "p18_twin_b:spec"},
          {"p18_twin_b": SPEC.format(name="twin", api=1)})  # fmt: skip
    raiser = "def make():\n    raise RuntimeError('no licence server')\n"
    _dist(site, "autoglm-raiser", {"raiser": "p18_raiser:make"}, {"p18_raiser": raiser})
    _dist(site, "autoglm-good", {"good": "p18_good:spec"}, {"p18_good": SPEC.format(name="good", api=1)})
    return site


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Put folders on ``sys.path`` and discover again; the registry as it was afterwards."""

    def use(*sites: Path) -> None:
        for site in sites:
            monkeypatch.syspath_prepend(str(site))
        plugins.discover()

    yield use
    monkeypatch.undo()
    plugins.discover()


def test_the_built_in_processors_come_from_our_own_entry_points() -> None:
    plugins.discover()
    for name in ("cnn", "mfcc", "minilm", "passthrough"):
        origin = plugins.origin_of(name)
        assert origin.package == "open-autoglm", (name, origin)
        assert origin.source == f"entry point {name} = processors.registry:{name}"
    assert plugins.REFUSED == {}


def test_an_installed_plugin_is_discovered_with_its_package_and_version(
    sharpness_site: Path, on_path: Any
) -> None:
    assert "sharpness" not in plugins.registered()
    on_path(sharpness_site)
    spec = plugins.registered()["sharpness"]
    assert spec.modality == "image" and spec.api == plugins.API_VERSION
    origin = plugins.origin_of("sharpness")
    assert (origin.package, origin.version) == ("autoglm-sharpness", "0.1.0")
    assert origin.source == "entry point sharpness = autoglm_sharpness:spec"


def test_autoglm_plugins_lists_every_processor_with_package_version_modalities_origin(
    sharpness_site: Path,
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engine.tools.cli", "plugins"],
        env=_env(sharpness_site), cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = {line.split()[0]: line.split() for line in out.splitlines()}
    assert lines["sharpness"][:4] == ["sharpness", "image", "autoglm-sharpness", "0.1.0"]
    assert lines["passthrough"][:4] == ["passthrough", "any", "open-autoglm", "0.1.0"]
    assert " ".join(lines["sharpness"][4:]) == "entry point sharpness = autoglm_sharpness:spec"


def test_each_bad_plugin_is_refused_naming_package_entry_point_and_reason(
    bad_site: Path, on_path: Any
) -> None:
    on_path(bad_site)
    refused = dict(plugins.REFUSED)
    assert set(refused) == {"oldapi", "twin", "raiser"}
    assert "package autoglm-oldapi entry point oldapi = p18_oldapi:spec" in refused["oldapi"]
    assert "targets plugin API version 0; this engine speaks 1" in refused["oldapi"]
    assert "autoglm-twin-a" in refused["twin"] and "autoglm-twin-b" in refused["twin"]
    assert "2 packages claim the processor name 'twin'" in refused["twin"]
    assert "package autoglm-raiser entry point raiser = p18_raiser:make" in refused["raiser"]
    assert "RuntimeError: no licence server" in refused["raiser"]
    known = plugins.registered()
    assert "good" in known and not {"oldapi", "twin", "raiser"} & set(known)
    assert {"cnn", "mfcc", "minilm", "passthrough"} <= set(known)  # the rest still load


def test_a_route_naming_a_refused_plugin_is_a_config_error(bad_site: Path, on_path: Any) -> None:
    on_path(bad_site)
    route = {"modality": "text", "processor": "raiser"}
    with pytest.raises(ConfigError) as err:
        make_config("x", routes=[route])
    (line,) = err.value.problems
    assert line.startswith('routes[0].processor = "raiser": package autoglm-raiser entry point raiser')
    assert "RuntimeError: no licence server" in line


def _routing(tmp: Path, processor: str) -> Path:
    path = tmp / "routing.toml"
    path.write_text(
        f'[nats]\nsubject_prefix = "p18"\n[[routes]]\nmodality = "text"\nprocessor = "{processor}"\n'
    )
    return path


def test_the_engine_refuses_to_start_when_a_route_uses_a_refused_plugin(
    bad_site: Path, tmp_path: Path
) -> None:
    for command in (["validate", str(_routing(tmp_path, "oldapi"))],
                    ["run", "--config", str(_routing(tmp_path, "oldapi"))]):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "engine.tools.cli", *command],
            env=_env(bad_site), cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "package autoglm-oldapi entry point oldapi = p18_oldapi:spec" in done.stderr
        assert "targets plugin API version 0" in done.stderr


def test_validate_notes_refused_plugins_no_route_uses(bad_site: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engine.tools.cli", "validate", str(_routing(tmp_path, "good"))],
        env=_env(bad_site), cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "processor 'raiser' (no route uses it)" in done.stderr


async def test_the_engine_runs_with_the_rest_when_no_route_uses_the_refused_ones(
    bad_site: Path, on_path: Any, nc: Any, nats_url: str, prefix: str
) -> None:
    on_path(bad_site)
    assert plugins.REFUSED
    out = await collect(nc, f"{prefix}.out.>")
    engine = Engine(make_config(prefix, routes=[{"modality": "text", "processor": "good"}]))
    await engine.start(nats_url)
    try:
        await send(nc, prefix, "cam", "text", b"hello", time.time_ns(), event_id="t1")
        await out.wait_events({"t1"})
    finally:
        await engine.stop()


def _jpeg(blur: bool) -> bytes:
    img = np.kron((np.indices((24, 32)).sum(axis=0) % 2) * 255, np.ones((10, 10))).astype(np.uint8)
    if blur:
        img = cv2.GaussianBlur(img, (31, 31), 12)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    assert ok
    return buf.tobytes()


async def test_a_route_to_the_installed_plugin_end_to_end(
    sharpness_site: Path, on_path: Any, nc: Any, nats_url: str, prefix: str
) -> None:
    on_path(sharpness_site)
    out = await collect(nc, f"{prefix}.out.>")
    dlq = await collect(nc, f"{prefix}.dlq.>")
    route = {"modality": "image", "processor": "sharpness", "params": {"threshold": 50.0}}
    engine = Engine(make_config(prefix, routes=[route], aligner={"window_ms": 1000}))
    await engine.start(nats_url)
    try:
        now = time.time_ns()
        await send(nc, prefix, "sharp", "image", _jpeg(blur=False), now, event_id="s1")
        await send(nc, prefix, "soft", "image", _jpeg(blur=True), now, event_id="b1")
        await send(nc, prefix, "soft", "image", b"not a jpeg", now, event_id="bad")
        await out.wait_events({"s1", "b1"})
        (rejected,) = await dlq.wait_for(1)
    finally:
        await engine.stop()
    assert rejected["reason"] == "decode_error" and rejected["event_id"] == "bad"
    by_source = {body["source"]: body for _, _, body in out.items}
    sharp, soft = by_source["sharp"]["features"]["image"], by_source["soft"]["features"]["image"]
    assert sharp["blurry"] == 0.0 and soft["blurry"] == 1.0
    assert sharp["sharpness"] > 50.0 > soft["sharpness"]
    model = by_source["sharp"]["models"]["image"]
    assert model["processor"] == "sharpness" and model["model"] == "laplacian-variance"
    assert model["version"].startswith("sha256:") and len(model["version"]) == len("sha256:") + 12
    assert by_source["soft"]["models"] == by_source["sharp"]["models"]


async def test_a_plugin_installed_while_the_engine_runs_is_found_by_the_next_reload(
    sharpness_site: Path, on_path: Any, tmp_path: Path
) -> None:
    from engine.runtime.reload import read

    on_path()  # the engine started without it
    path = tmp_path / "routing.toml"
    path.write_text('[[routes]]\nmodality = "image"\nprocessor = "sharpness"\n')
    with pytest.raises(ConfigError, match="unknown processor"):
        await read(path, {})
    sys.path.insert(0, str(sharpness_site))  # "pip install" happened
    try:
        cfg = await read(path, {})
    finally:
        sys.path.remove(str(sharpness_site))
    assert cfg.routes[0].processor == "sharpness"


def test_parse_config_accepts_a_route_to_an_installed_plugin(sharpness_site: Path, on_path: Any) -> None:
    on_path(sharpness_site)
    cfg = parse_config({"routes": [{"modality": "image", "processor": "sharpness"}]}, env={})
    assert cfg.routes[0].processor == "sharpness"
    with pytest.raises(ConfigError, match=r"routes\[0\].params.threshold"):
        parse_config(
            {"routes": [{"modality": "image", "processor": "sharpness", "params": {"threshold": -1}}]}, env={}
        )


def _readme_plugin(folder: Path) -> Path:
    """The two files of the README's "Writing a processor", as given there."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Writing a processor", 1)[1].split("\n## ", 1)[0]
    toml = section.split("```toml\n", 1)[1].split("```", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    folder.mkdir()
    (folder / "pyproject.toml").write_text(toml)
    (folder / "autoglm_wordcount.py").write_text(code)
    return folder


async def test_the_readme_plugin_installs_and_runs_as_written(
    tmp_path: Path, on_path: Any, nc: Any, nats_url: str, prefix: str
) -> None:
    site = tmp_path / "site"
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(site), str(_readme_plugin(tmp_path / "wordcount"))],
        check=True,
    )  # fmt: skip
    on_path(site)
    assert plugins.origin_of("wordcount").package == "autoglm-wordcount"
    out = await collect(nc, f"{prefix}.out.>")
    route = {"modality": "text", "processor": "wordcount", "params": {"lowercase": False}}
    engine = Engine(make_config(prefix, routes=[route]))
    await engine.start(nats_url)
    try:
        await send(nc, prefix, "cam", "text", b"Three Words Here", time.time_ns(), event_id="w1")
        await out.wait_events({"w1"})
    finally:
        await engine.stop()
    (body,) = [b for _, _, b in out.items]
    assert body["features"]["text"]["words"] == 3.0 and body["features"]["text"]["texts"] == [
        "Three Words Here"
    ]
    assert body["models"]["text"]["processor"] == "wordcount"
