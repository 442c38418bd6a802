from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from engine.config.models import (
    EngineConfig,
    load_config,
    nats_from_env,
    parse_config,
    updated,
    with_overrides,
)
from engine.contracts.errors import ConfigError
from engine.tools.cli import main

ROOT = Path(__file__).resolve().parent.parent


def problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    return info.value.problems


def routes(n: int = 3, **batch: object) -> list[dict[str, object]]:
    mods = ["image", "audio", "text"]
    return [{"modality": mods[i % 3], "processor": "passthrough", "batch": dict(batch)} for i in range(n)]


def test_shipped_routing_toml_is_valid() -> None:
    cfg = load_config(ROOT / "routing.toml", env={})
    assert [r.processor for r in cfg.routes] == ["cnn", "mfcc", "minilm"]
    assert cfg.nats.url is None  # the default runs on the embedded server
    assert cfg.glm.backend == "none"


def test_error_names_the_key_and_the_value() -> None:
    data = {
        "routes": [*routes(2), {"modality": "text", "processor": "passthrough", "batch": {"max_wait_ms": -5}}]
    }
    assert problems(data) == ["routes[2].batch.max_wait_ms = -5: must be >= 0"]


def test_every_bad_key_is_reported_at_once() -> None:
    data = {
        "routes": routes(1, max_batch_size=0, overload="panic"),
        "aligner": {"window_ms": 0, "colour": "red"},
        "nats": {"subject_prefix": "bad prefix"},
    }
    found = problems(data)
    assert "routes[0].batch.max_batch_size = 0: must be >= 1" in found
    assert any(p.startswith('routes[0].batch.overload = "panic": must be one of') for p in found)
    assert "aligner.window_ms = 0: must be > 0" in found
    assert 'aligner.colour = "red": unknown key' in found
    assert any(p.startswith('nats.subject_prefix = "bad prefix": must be dot-separated') for p in found)


def test_routes_are_required() -> None:
    assert problems({}) == ["routes: is required"]
    assert problems({"routes": []}) == ["routes = []: needs at least 1 entries"]


def test_processor_and_params_are_checked_against_the_registry() -> None:
    found = problems(
        {
            "routes": [
                {"modality": "image", "processor": "nope"},
                {"modality": "image", "processor": "mfcc"},
                {"modality": "audio", "processor": "mfcc", "params": {"n_mfcc": 0, "colour": 1}},
                {"modality": "image", "processor": "cnn", "device": "tpu"},
            ]
        }
    )
    assert any(p.startswith('routes[0].processor = "nope": unknown processor') for p in found)
    assert 'routes[1].processor = "mfcc": handles audio, not image' in found
    assert "routes[2].params.n_mfcc = 0: must be >= 1" in found
    assert "routes[2].params.colour = 1: unknown key" in found
    assert any(p.startswith('routes[3].device = "tpu": must be "auto"') for p in found)


def test_template_variables_are_checked_at_load_time() -> None:
    found = problems({"routes": routes(1), "glm": {"template": "{source} {weather}"}})
    assert len(found) == 1
    assert found[0].startswith('glm.template = "{source} {weather}": unknown template variable(s) weather')


def test_env_overrides_nats_url() -> None:
    cfg = parse_config({"routes": routes(1)}, env={"AUTOGLM_NATS_URL": "nats://10.0.0.1:4222"})
    assert cfg.nats.url == "nats://10.0.0.1:4222"
    assert parse_config({"routes": routes(1)}, env={}).nats.url is None


def test_config_is_frozen() -> None:
    cfg = parse_config({"routes": routes(1)}, env={})
    with pytest.raises(Exception, match="frozen"):
        cfg.aligner.window_ms = 5  # type: ignore[misc]


def test_toml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[nats\nurl = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value)
    assert "not valid TOML" in info.value.problems[0]
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")


def test_validate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "routing.toml")]) == 0
    assert ": ok (image->cnn+ocr, audio->mfcc+vad+asr, text->minilm" in capsys.readouterr().out
    bad = tmp_path / "r.toml"
    bad.write_text(
        '[[routes]]\nmodality = "text"\nprocessor = "minilm"\n[routes.batch]\nmax_wait_ms = -5\n'
        "[aligner]\nallowed_lateness_ms = -1\n"
    )
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "routes[0].batch.max_wait_ms = -5: must be >= 0" in err
    assert "aligner.allowed_lateness_ms = -1: must be >= 0" in err


def test_glm_settings_are_checked_together() -> None:
    found = problems({"routes": routes(1), "glm": {"backend": "openai", "max_in_flight": 0}})
    assert 'glm.base_url: is required when backend = "openai"' in found
    assert 'glm.model: is required when backend = "openai"' in found
    assert "glm.max_in_flight = 0: must be >= 1" in found
    found = problems({"routes": routes(1), "glm": {"backend": "none", "attach_images": True}})
    assert found == [
        "glm.attach_images = true: the image route needs params.thumbnail > 0 (the key frame's size)"
    ]
    ok = {"routes": [{"modality": "image", "processor": "cnn", "params": {"thumbnail": 256}}]}
    assert parse_config({**ok, "glm": {"attach_images": True}}, env={}).glm.attach_images


def test_numbers_and_booleans_must_have_their_toml_type() -> None:
    """``window_ms = "1000"`` was taken as 1000: strict types, one line per key."""
    r = routes(1)
    assert problems({"routes": r, "aligner": {"window_ms": "1000"}}) == [
        'aligner.window_ms = "1000": must be an integer, not a string'
    ]
    assert problems({"routes": r, "aligner": {"window_ms": 1000.0}}) == [
        "aligner.window_ms = 1000.0: must be an integer, not a float"
    ]
    assert problems({"routes": r, "glm": {"temperature": "0.5"}}) == [
        'glm.temperature = "0.5": must be a number, not a string'
    ]
    assert problems({"routes": r, "nats": {"durable": 1}}) == [
        "nats.durable = 1: must be true or false, not an integer"
    ]
    assert problems({"routes": r, "metrics": {"port": True}}) == [
        "metrics.port = true: must be an integer, not a boolean"
    ]
    assert problems({"routes": r, "aligner": {"require": "image"}}) == [
        'aligner.require = "image": must be an array, not a string'
    ]
    assert problems({"routes": r, "tracing": 5}) == ["tracing = 5: must be a table, not an integer"]
    # a route whose entries are wrong is reported once, not also as "needs at least 1 entries"
    bad_route = [{"modality": "text", "processor": "passthrough", "batch": {"max_wait_ms": "5"}}]
    assert problems({"routes": bad_route}) == [
        'routes[0].batch.max_wait_ms = "5": must be a number, not a string'
    ]
    # an integer still fills a float, and arrays still become tuples
    cfg = parse_config(
        {"routes": r, "glm": {"call_timeout_s": 5, "temperature": 1}, "aligner": {"require": ["text"]}},
        env={},
    )
    assert cfg.glm.call_timeout_s == 5.0 and isinstance(cfg.glm.temperature, float)
    assert cfg.aligner.require == ("text",)


def test_every_toml_we_ship_or_document_still_loads() -> None:
    """routing.toml, and each ```toml block of the README and the docs pages (a fragment:
    given a route when it has none, checked for types and ranges; files it names need not
    exist here)."""
    load_config(ROOT / "routing.toml", env={})
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [b for page in pages for b in re.findall(r"```toml\n(.*?)```", page.read_text(), re.S)]
    assert len(blocks) >= 5
    for block in blocks:
        data = tomllib.loads(block)
        if "build-system" in data:  # a plugin's pyproject.toml (README, "Writing a processor")
            continue
        data.setdefault("routes", routes(1))
        for route in data["routes"]:
            route.setdefault("processor", "passthrough")
        EngineConfig.model_validate(data)


def test_command_line_overrides_are_validated_like_the_file() -> None:
    """``model_copy(update=)`` validated nothing: ``--metrics-port 70000`` was taken."""
    cfg = parse_config({"routes": routes(1)}, env={})
    with pytest.raises(ConfigError) as info:
        with_overrides(cfg, {"metrics": {"port": 70000}})
    assert info.value.problems == ["metrics.port = 70000: must be <= 65535"]
    with pytest.raises(ConfigError) as info:
        with_overrides(cfg, {"tracing": {"file": 7, "colour": "red"}})
    assert sorted(info.value.problems) == [
        'tracing.colour = "red": unknown key',
        "tracing.file = 7: must be a string, not an integer",
    ]
    assert with_overrides(cfg, {"metrics": {"port": 9464}}).metrics.port == 9464
    # the environment's connection settings go through the same check
    env = {"AUTOGLM_NATS_URL": "nats://10.0.0.1:4222", "AUTOGLM_NATS_USER": "eng"}
    nats = nats_from_env(cfg.nats, env)
    assert nats.url == "nats://10.0.0.1:4222" and nats.auth.user == "eng"
    with pytest.raises(ConfigError) as info:
        updated(cfg.aligner, {"window_ms": "5"}, ("aligner",))
    assert info.value.problems == ['aligner.window_ms = "5": must be an integer, not a string']
