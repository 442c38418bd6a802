"""The prompt template grammar: ``str.format`` placeholders and the names a
``routing.toml`` template may use.

Shared by the config check (an unknown variable is a load-time error) and
:class:`engine.glm.prompts.PromptTemplate`, which fills templates in.
"""

from __future__ import annotations

import string

#: Variables a routing.toml template may use.
TEMPLATE_VARIABLES = frozenset(
    {"source", "start", "end", "image", "audio", "text", "scene", "missing", "history"}
)


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
