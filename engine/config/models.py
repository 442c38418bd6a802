"""``routing.toml`` -> frozen pydantic models: data only.

The models import no live class; :mod:`engine.runtime.build` turns them into
routes, batchers, the aligner, the GLM stage and tracing. Validation errors
name the TOML key and the bad value, one line each:
``routes[2].batch.max_wait_ms = -5: must be >= 0``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from engine.config.checks import Frozen, format_errors, glm_problems, route_problems, updated
from engine.config.nats import (
    AUTH_ENV,
    NATS_URL_ENV,
    AuthConfig,
    NatsConfig,
    TlsConfig,
    nats_from_env,
    nats_problems,
)
from engine.contracts.errors import ConfigError
from engine.contracts.templates import check_template
from engine.contracts.types import Modality

__all__ = [
    "AUTH_ENV",
    "NATS_URL_ENV",
    "AlignerConfig",
    "AuthConfig",
    "BatchConfig",
    "EngineConfig",
    "GLMConfig",
    "LimitsConfig",
    "MetricsConfig",
    "NatsConfig",
    "Overrides",
    "RouteConfig",
    "TlsConfig",
    "TracingConfig",
    "VariantConfig",
    "format_errors",
    "load_config",
    "nats_from_env",
    "nats_problems",
    "parse_config",
    "updated",
    "with_overrides",
]

_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
_SUBJECT_RE = re.compile(r"[^\s.]+(\.[^\s.]+)*")


def _check_device(v: str) -> str:
    if not _DEVICE_RE.fullmatch(v):
        raise ValueError('must be "auto", "cpu", "cuda" or "cuda:N"')
    return v


class LimitsConfig(Frozen):
    max_payload_bytes: int = Field(8 * 1024 * 1024, gt=0, le=64 * 1024 * 1024)


class BatchConfig(Frozen):
    """Micro-batching of one route: flush at ``max_batch_size`` or ``max_wait_ms``."""

    max_batch_size: int = Field(8, ge=1, le=4096)
    max_wait_ms: float = Field(5.0, ge=0, le=60_000)
    #: Items waiting for a batch; past it the ``overload`` policy applies.
    max_queue: int = Field(1024, ge=1)
    overload: Literal["drop_oldest", "reject_new"] = "drop_oldest"


class VariantConfig(Frozen):
    """One arm of a route's A/B test: its own processor params (and processor or
    dtype), a share of the route's sources, or a shadow that runs beside them."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    #: Its share of the sources, relative to the other live variants' weights.
    #: Finite: ``inf`` would make every share ``inf / inf``, NaN.
    weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    #: Empty: the route's processor.
    processor: str = ""
    #: On top of the route's ``params``.
    params: dict[str, Any] = Field(default_factory=dict)
    #: Empty: the route's dtype.
    dtype: Literal["", "float32", "float16", "bfloat16"] = ""
    #: Runs on every event of the route; its features are compared with the
    #: live ones and dropped, never fused or sent to the GLM.
    shadow: bool = False


class AlsoConfig(Frozen):
    """Another processor on a route's events (``[[routes.also]]``): its features
    fuse beside the route processor's, in the same modality's summary."""

    processor: str
    params: dict[str, Any] = Field(default_factory=dict)


class RouteConfig(Frozen):
    """One route: events of ``modality`` (optionally matching ``subject``) -> processor."""

    modality: Modality
    processor: str
    #: NATS wildcard pattern (``*``, ``>``) further restricting the route.
    subject: str | None = None
    device: str = "auto"
    #: Model precision on CUDA; on a CPU the models stay in float32.
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    #: Worker threads that run this route's decode and model work.
    workers: int = Field(1, ge=1, le=64)
    #: Threads decoding the events of one batch in parallel.
    prepare_threads: int = Field(1, ge=1, le=64)
    params: dict[str, Any] = Field(default_factory=dict)
    #: More processors on the same events, on the route's device and threads.
    also: tuple[AlsoConfig, ...] = Field((), strict=False)
    batch: BatchConfig = BatchConfig()
    #: What happens when this route cannot keep up. ``complete``: nothing is
    #: skipped; intake waits for room in the batch queue, so the backlog stays
    #: in NATS (JetStream holds it and stops delivering at max_ack_pending).
    #: ``real_time``: an event older than ``max_staleness_ms`` (event time vs
    #: the engine clock) when its batch starts is skipped and counted as
    #: ``stale``, and a full queue applies ``batch.overload``: latency stays flat.
    intake: Literal["complete", "real_time"] = "complete"
    max_staleness_ms: int = Field(1000, gt=0)
    #: A/B test: each source goes to one live variant, by a stable hash of
    #: ``experiment`` and its name, in proportion to the weights.
    variants: tuple[VariantConfig, ...] = Field((), strict=False)
    experiment: str = ""

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: tuple[VariantConfig, ...]) -> tuple[VariantConfig, ...]:
        names = [x.name for x in v]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must differ (given: {', '.join(names)})")
        if v and not any(x.weight > 0 and not x.shadow for x in v):
            raise ValueError("needs a variant that is not a shadow and has a weight above 0")
        return v

    _device = field_validator("device")(classmethod(lambda cls, v: _check_device(v)))

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str | None) -> str | None:
        if v is not None and not _SUBJECT_RE.fullmatch(v):
            raise ValueError("must be a NATS subject pattern such as autoglm.in.*.image")
        return v


class AlignerConfig(Frozen):
    """Event-time fusion per source (see docs/aligner.md)."""

    mode: Literal["window", "nearest"] = "window"
    window_ms: int = Field(1000, gt=0, le=3_600_000)
    #: ``nearest`` mode: one frame per event of ``pivot``; each other modality
    #: adds its event nearest in time within ``slop_ms``.
    pivot: Modality = "image"
    slop_ms: int = Field(50, ge=0)
    allowed_lateness_ms: int = Field(0, ge=0)
    idle_timeout_ms: int = Field(2000, gt=0)
    max_future_ms: int = Field(10_000, ge=0)
    require: tuple[Modality, ...] = Field((), strict=False)
    on_missing: Literal["emit", "drop"] = "emit"
    #: The modalities a complete frame has; ``missing`` is computed against it.
    expect: tuple[Modality, ...] = Field(("image", "audio", "text"), strict=False)
    #: Where ``too_late`` records go: the DLQ, or ``<prefix>.late.<source>``.
    late_to: Literal["dlq", "late"] = "dlq"
    max_open_windows: int = Field(64, ge=1)
    max_sources: int = Field(10_000, ge=1)


class GLMConfig(Frozen):
    """The model called with each fused frame (see docs/glm.md)."""

    #: ``none`` publishes the prompt with a null answer; ``transformers``/``hf``
    #: runs a local causal LM; ``openai``/``vllm`` calls a chat-completions API.
    backend: Literal["none", "transformers", "hf", "openai", "vllm"] = "none"
    #: transformers: a local directory or a cached model id; openai: the model name.
    model: str = ""
    base_url: str = ""
    #: The *name* of the environment variable holding the API key.
    api_key_env: str = "OPENAI_API_KEY"
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_new_tokens: int = Field(128, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int = 0
    system_prompt: str = ""
    #: Per HTTP request (openai); ``call_timeout_s`` bounds a whole call, retries included.
    timeout_s: float = Field(30.0, gt=0)
    call_timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0, le=20)
    backoff_s: float = Field(0.5, ge=0)
    #: GLM calls never block ingestion: a bounded queue in front of the backend.
    max_in_flight: int = Field(2, ge=1, le=256)
    max_queue: int = Field(64, ge=1)
    overload: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    #: transformers: prompts from several sources in one ``generate`` call.
    batch_size: int = Field(4, ge=1, le=256)
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown_s: float = Field(30.0, gt=0)
    #: openai: attach the window's key frame (needs the image route's params.thumbnail).
    attach_images: bool = False
    #: Put the prompt in results that made no model call (backend "none",
    #: skipped frames). Building it is a good part of the per-window cost on a
    #: fast stream; false leaves ``"prompt": null`` there.
    include_prompt: bool = True
    #: Per source: the last ``history`` answers go into the next prompt.
    history: int = Field(3, ge=0, le=100)
    history_chars: int = Field(2000, ge=0)
    trigger: Literal["every", "on_change"] = "every"
    change_threshold: float = Field(0.3, ge=0, le=1)
    max_interval_ms: int = Field(10_000, gt=0)
    #: ``{scene}``: what was seen and heard, in words (processors say how
    #: theirs read); ``{image}``/``{audio}``: one modality's words; ``{text}``: the messages.
    template: str = (
        "Source {source}, one window.\n{scene}\nMessages: {text}\nMissing: {missing}\n"
        "Earlier: {history}\nDescribe what is happening."
    )

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        check_template(v)
        return v

    _device = field_validator("device")(classmethod(lambda cls, v: _check_device(v)))


class MetricsConfig(Frozen):
    """Prometheus ``/metrics``; off unless a port is set (0 picks a free one)."""

    port: int | None = Field(None, ge=0, le=65535)
    host: str = "127.0.0.1"
    #: Per-source series (bounded by aligner.max_sources): off by default, since
    #: thousands of cameras would mean thousands of series.
    per_source: bool = False


class TracingConfig(Frozen):
    """OpenTelemetry spans (engine/observe/tracing.py); on when an exporter is set.

    ``endpoint`` is an OTLP/HTTP traces URL (``http://collector:4318/v1/traces``);
    the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``
    variables work too. ``file`` appends spans as JSON lines (no collector needed).
    """

    endpoint: str = ""
    file: str = ""
    service_name: str = Field("autoglm", min_length=1)
    #: For traces the engine starts; a producer's sampled flag is obeyed as sent.
    sample_ratio: float = Field(1.0, ge=0, le=1)
    #: Spans buffered for export; beyond it the SDK drops (and counts) them.
    max_queue: int = Field(8192, ge=1)
    export_timeout_s: float = Field(10.0, gt=0)


class EngineConfig(Frozen):
    nats: NatsConfig = NatsConfig()
    limits: LimitsConfig = LimitsConfig()
    routes: tuple[RouteConfig, ...] = Field(min_length=1, strict=False)
    aligner: AlignerConfig = AlignerConfig()
    glm: GLMConfig = GLMConfig()
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()


def parse_config(data: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> EngineConfig:
    """Validate a parsed TOML document; ``AUTOGLM_NATS_URL`` overrides ``nats.url``
    and the ``AUTH_ENV`` variables the auth and TLS settings."""
    env = os.environ if env is None else env
    problems: list[str] = []
    cfg: EngineConfig | None = None
    try:
        cfg = EngineConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(format_errors(exc))
    problems.extend(route_problems(data.get("routes")))
    problems.extend(glm_problems(data))
    if problems or cfg is None:
        raise ConfigError(problems)
    cfg = updated(cfg, {"nats": nats_from_env(cfg.nats, env)})
    problems = nats_problems(cfg.nats)
    if problems:
        raise ConfigError(problems)
    return cfg


#: ``{section: {key: value}}`` set on the command line (``--metrics-port``...).
Overrides = Mapping[str, Mapping[str, Any]]


def with_overrides(cfg: EngineConfig, overrides: Overrides) -> EngineConfig:
    """``cfg`` with command-line values on top, validated like the file's own
    (:class:`ConfigError` names ``section.key``); re-applied on every hot reload."""
    update = {s: updated(getattr(cfg, s), kv, (s,)) for s, kv in overrides.items() if kv}
    return updated(cfg, update) if update else cfg


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> EngineConfig:
    """Read and validate ``routing.toml``; :class:`ConfigError` names each bad key."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"file not found: {p}"], path=str(p)) from None
    except IsADirectoryError:
        raise ConfigError([f"not a file but a directory: {p}"], path=str(p)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read {p}: {exc.strerror or exc}"], path=str(p)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid TOML: {exc}"], path=str(p)) from exc
    try:
        return parse_config(data, env=env)
    except ConfigError as exc:
        raise ConfigError(exc.problems, path=str(p)) from None
