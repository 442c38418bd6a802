"""Prompt templates and the words a fused frame turns into.

``PromptTemplate`` is ``str.format`` that names what is missing or unknown;
:func:`prompt_values` maps a fused frame (plus the source's recent answers)
onto the variables a ``routing.toml`` template may use.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.contracts.errors import ConfigError
from engine.contracts.templates import template_fields
from engine.contracts.types import MODALITIES, FusedFrame, ModalityFusion, Nanos
from engine.contracts.vocabulary import vocabulary_of


class PromptTemplate:
    """A ``str.format`` template that names what is missing or unknown.

    >>> PromptTemplate("请简要介绍人工智能：{topic}").format(topic="发展历程")
    '请简要介绍人工智能：发展历程'
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
            raise ConfigError([f"prompt template {self.template[:40]!r}: {'; '.join(parts)}"])
        return self.template.format(**values)


def describe(mod: ModalityFusion | None) -> str:
    """One line of plain words for a modality (what the GLM reads), in the
    words of the vocabulary that fused it."""
    return "none" if mod is None else vocabulary_of(mod).describe(mod)


@dataclass(frozen=True, slots=True)
class Answer:
    start_ns: Nanos
    end_ns: Nanos
    text: str


class History:
    """A source's last answers, bounded in count and in characters."""

    def __init__(self, max_items: int, max_chars: int) -> None:
        self.max_chars = max_chars
        self._items: deque[Answer] = deque(maxlen=max_items)

    def add(self, start_ns: Nanos, end_ns: Nanos, text: str) -> None:
        if self._items.maxlen:
            self._items.append(Answer(start_ns, end_ns, text))

    def answers(self) -> tuple[Answer, ...]:
        """Oldest first (what another worker needs to go on)."""
        return tuple(self._items)

    def render(self) -> str:
        """Newest last; the oldest lines go first when over ``max_chars``."""
        lines = [f"[{a.start_ns}..{a.end_ns}] {a.text.strip()}" for a in self._items]
        while lines and sum(len(x) + 1 for x in lines) > self.max_chars:
            lines.pop(0)
        if lines and len(lines[-1]) > self.max_chars:
            lines[-1] = lines[-1][: self.max_chars]
        return "\n".join(lines) or "none"

    def __len__(self) -> int:
        return len(self._items)


def prompt_values(frame: FusedFrame, history: str = "none") -> dict[str, object]:
    """The template variables for one fused frame. ``scene`` is what was seen
    and heard, in one paragraph: the image and audio words (the built-in
    processors say them as sentences, numbers left to the JSON result);
    ``text`` stays the messages themselves."""
    words = {m: describe(frame.modalities.get(m)) for m in MODALITIES}
    scene = " ".join(w for m, w in words.items() if m != "text" and m in frame.modalities and w)
    return {
        "source": frame.source,
        "start": frame.start_ns,
        "end": frame.end_ns,
        "image": words["image"],
        "audio": words["audio"],
        "text": words["text"],
        "scene": scene or "Nothing recognisable.",
        "missing": ", ".join(frame.missing) or "nothing",
        "history": history,
    }
