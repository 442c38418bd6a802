"""The GLM stage: fused frame -> prompt -> (optionally) a model's answer.

This module owns prompt templates and the stage object the engine calls.
``backend = "none"`` builds and publishes the prompt with a null answer, so
the engine runs with no model at all.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import TYPE_CHECKING

from engine.errors import ConfigError
from engine.types import FusedFrame, ModalityFusion

if TYPE_CHECKING:
    from engine.config import GLMConfig

#: Variables a routing.toml template may use.
TEMPLATE_VARIABLES = frozenset({"source", "start", "end", "image", "audio", "text", "missing"})


def template_fields(template: str) -> list[str]:
    """Names of the ``{placeholders}`` in a ``str.format`` template."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            if not name.isidentifier():
                raise ValueError(f"placeholder {{{name}}} must be a plain name")
            names.append(name)
    return names


def check_template(template: str, allowed: frozenset[str] = TEMPLATE_VARIABLES) -> None:
    """Raise ``ValueError`` naming unknown placeholders (a config error at load time)."""
    unknown = sorted(set(template_fields(template)) - allowed)
    if unknown:
        raise ValueError(
            f"unknown template variable(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
        )


class PromptTemplate:
    """A ``str.format`` template that names what is missing or unknown.

    >>> PromptTemplate("Hello {name}").format(name="GLM")
    'Hello GLM'
    """

    def __init__(self, template: str) -> None:
        self.template = template
        self.variables = frozenset(template_fields(template))

    def format(self, **values: object) -> str:
        missing = sorted(self.variables - values.keys())
        unknown = sorted(values.keys() - self.variables)
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing variable(s) {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown variable(s) {', '.join(unknown)}")
            raise ConfigError([f"prompt template: {'; '.join(parts)}"])
        return self.template.format(**values)


def _fmt(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def describe(mod: ModalityFusion | None, skip: frozenset[str] = frozenset()) -> str:
    """One line of plain words for a modality's summary (what the GLM reads)."""
    if mod is None:
        return "none"
    s: Mapping[str, object] = mod.summary
    if "texts" in s and isinstance(s["texts"], list):
        return " | ".join(str(t) for t in s["texts"])
    parts = [f"{s['count']} event(s)"]
    for key, value in s.items():
        if key in skip or key in ("count", "mfcc_std", "embedding_dim"):
            continue
        if isinstance(value, list):
            if key == "mfcc_mean":
                parts.append(f"mfcc_mean[0:3]={[_fmt(x) for x in value[:3]]}")
            elif key == "labels":
                parts.append("labels=" + ", ".join(str(x) for x in value))
            continue
        parts.append(f"{key}={_fmt(value)}")
    return ", ".join(parts)


def prompt_values(frame: FusedFrame) -> dict[str, object]:
    """The template variables for one fused frame."""
    return {
        "source": frame.source,
        "start": frame.start_ns,
        "end": frame.end_ns,
        "image": describe(frame.modalities.get("image"), frozenset({"hist"})),
        "audio": describe(frame.modalities.get("audio")),
        "text": describe(frame.modalities.get("text")),
        "missing": ", ".join(frame.missing) or "nothing",
    }


class GLMStage:
    """Builds the prompt for each fused frame and asks the configured backend."""

    def __init__(self, config: GLMConfig) -> None:
        self.config = config
        self.template = PromptTemplate(config.template)
        self.calls = 0

    def prompt(self, frame: FusedFrame) -> str:
        values = prompt_values(frame)
        return self.template.format(**{k: values[k] for k in self.template.variables})

    async def answer(self, prompt: str) -> str | None:
        """The model's answer; ``None`` with ``backend = "none"``."""
        if self.config.backend == "none":
            return None
        raise ConfigError([f"glm.backend = {self.config.backend!r}: not available"])
