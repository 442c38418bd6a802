"""Checks of a ``routing.toml`` that a single pydantic field cannot make, and
the lines they report: one ``key = value: reason`` per problem, secrets hidden.

The models' strictness (:class:`Frozen`) is here too, so that every module
of ``engine.config`` builds on this one and none imports back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from engine.contracts.errors import ConfigError
from engine.contracts.plugins import REFUSED, hint, registered

M = TypeVar("M", bound=BaseModel)


class Frozen(BaseModel):
    """Strict: TOML has real numbers and booleans, so ``window_ms = "1000"`` or
    ``durable = 1`` is a mistake to report, not to guess at (an integer still
    fills a float field). Lists of TOML arrays become tuples (``Field(strict=False)``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _key(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def shown(v: object) -> str:
    """A value as a problem line shows it (JSON; ``1000.0`` as ``1000``)."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    try:
        return json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(v)


_SECRETS = ("password", "token")
_CMP = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
_CMP_CTX = {"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}
#: Strict types: what a key wants, and what TOML type it got instead.
_WANTS = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a table",
    "model_type": "a table",
    "list_type": "an array",
    "tuple_type": "an array",
}
_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
               tuple: "an array", dict: "a table"}  # fmt: skip


def _reason(err: Mapping[str, Any]) -> str:
    kind = str(err["type"])
    ctx = err.get("ctx") or {}
    if kind in _CMP:
        return f"must be {_CMP[kind]} {shown(ctx.get(_CMP_CTX[kind]))}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind in _WANTS:
        got = _TOML_TYPES.get(type(err.get("input")), type(err.get("input")).__name__)
        return f"must be {_WANTS[kind]}, not {got}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} entries"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")[:1].lower() + msg.removeprefix("Value error, ")[1:]


def format_errors(exc: ValidationError, prefix: Sequence[int | str] = ()) -> list[str]:
    """One ``key = value: reason`` line per pydantic error."""
    lines = []
    for err in exc.errors():
        key = _key([*prefix, *err["loc"]])
        given = err.get("input")
        if err["type"] == "too_short" and len(given) >= (err.get("ctx") or {}).get("min_length", 0):
            continue  # entries were given but were invalid: each is reported on its own
        if err["loc"] and err["loc"][-1] in _SECRETS:
            lines.append(f"{key} = (hidden): {_reason(err)}")  # never echo a secret
        elif err["type"] == "missing":
            lines.append(f"{key}: {_reason(err)}")
        elif err["type"] in _WANTS:  # the value exactly as given: 1000.0 is not 1000 here
            lines.append(f"{key} = {json.dumps(given, ensure_ascii=False, default=repr)}: {_reason(err)}")
        else:
            lines.append(f"{key} = {shown(given)}: {_reason(err)}")
    return lines


def updated(model: M, update: Mapping[str, Any], where: Sequence[int | str] = ()) -> M:
    """``model`` with ``update`` applied *and validated* (``model_copy(update=)``
    checks nothing, so ``port = 70000`` would pass). :class:`ConfigError` names
    each bad key, under ``where``."""
    try:
        return type(model).model_validate({**dict(model), **update})
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, where)) from None


def route_problems(raw_routes: object) -> list[str]:
    """Processor names and params checked against the registry, from the raw
    TOML so they are reported together with every other bad key. A variant's
    processor (its own, or the route's) and params (the route's, its own on
    top) are checked the same way, under ``routes[i].variants[j]``; and the
    ``[[routes.also]]`` processors of a route, under ``routes[i].also[j]``."""
    if not isinstance(raw_routes, list | tuple):
        return []
    problems: list[str] = []
    for i, route in enumerate(raw_routes):
        if not isinstance(route, Mapping):
            continue
        also = route.get("also", [])
        for j, extra in enumerate(also if isinstance(also, list | tuple) else []):
            if isinstance(extra, Mapping):
                alone = {"modality": route.get("modality"), **extra}  # its own params only
                problems.extend(_processor_problems(alone, alone, ["routes", i, "also", j]))
        variants = route.get("variants")
        if not isinstance(variants, list | tuple) or not variants:
            problems.extend(_processor_problems(route, route, ["routes", i]))
            continue
        for j, variant in enumerate(variants):
            if isinstance(variant, Mapping):
                problems.extend(_processor_problems(route, variant, ["routes", i, "variants", j]))
    return problems


def _processor_problems(
    route: Mapping[str, Any], part: Mapping[str, Any], where: list[int | str]
) -> list[str]:
    """One processor of a route (the route itself, or one of its variants)."""
    processors = registered()
    name = part.get("processor", route.get("processor"))
    if not isinstance(name, str):
        return []
    key = _key([*(where if "processor" in part else where[:2]), "processor"])
    spec = processors.get(name)
    if spec is None:
        if name in REFUSED:
            return [f"{key} = {shown(name)}: {REFUSED[name]}"]
        known = ", ".join(sorted(processors))
        return [f"{key} = {shown(name)}: unknown processor (known: {known}){hint()}"]
    modality = route.get("modality")
    if spec.modality is not None and modality in ("image", "audio", "text") and spec.modality != modality:
        return [f"{key} = {shown(name)}: handles {spec.modality}, not {modality}"]
    params = route.get("params", {})
    own = part.get("params", {}) if part is not route else {}
    if not isinstance(params, Mapping) or not isinstance(own, Mapping):
        return []
    try:
        spec.params.model_validate({**params, **own})
    except ValidationError as exc:
        return format_errors(exc, [*where, "params"])
    return []


def glm_problems(data: Mapping[str, Any]) -> list[str]:
    glm = data.get("glm")
    if not isinstance(glm, Mapping):
        return []
    backend = glm.get("backend", "none")
    problems = []
    if backend in ("openai",) and not glm.get("base_url"):
        problems.append('glm.base_url: is required when backend = "openai"')
    if backend in ("openai", "vllm", "transformers", "hf") and not glm.get("model"):
        problems.append(f'glm.model: is required when backend = "{backend}"')
    if glm.get("attach_images"):
        routes = data.get("routes") or []
        thumbs = [
            r.get("params", {}).get("thumbnail", 0)
            for r in routes
            if isinstance(r, Mapping)
            and r.get("modality") == "image"
            and isinstance(r.get("params", {}), Mapping)
        ]
        if not any(thumbs):
            problems.append(
                "glm.attach_images = true: the image route needs params.thumbnail > 0 (the key frame's size)"
            )
    return problems
