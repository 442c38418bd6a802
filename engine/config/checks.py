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
from engine.contracts.plugins import registered

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
    TOML so they are reported together with every other bad key; the
    ``[[routes.also]]`` processors of a route too."""
    if not isinstance(raw_routes, list | tuple):
        return []
    problems: list[str] = []
    for i, route in enumerate(raw_routes):
        if not isinstance(route, Mapping):
            continue
        modality = route.get("modality")
        problems.extend(_processor_problems(route, modality, ["routes", i]))
        also = route.get("also", [])
        for j, extra in enumerate(also if isinstance(also, list | tuple) else []):
            if isinstance(extra, Mapping):
                problems.extend(_processor_problems(extra, modality, ["routes", i, "also", j]))
    return problems


def _processor_problems(entry: Mapping[str, Any], modality: object, where: list[int | str]) -> list[str]:
    """One ``processor`` and its ``params`` (``where`` names the entry)."""
    name = entry.get("processor")
    if not isinstance(name, str):
        return []
    at = _key(where)
    processors = registered()
    spec = processors.get(name)
    if spec is None:
        return [f"{at}.processor = {shown(name)}: unknown processor (known: {', '.join(sorted(processors))})"]
    problems = []
    if spec.modality is not None and modality in ("image", "audio", "text") and spec.modality != modality:
        problems.append(f"{at}.processor = {shown(name)}: handles {spec.modality}, not {modality}")
    params = entry.get("params", {})
    if isinstance(params, Mapping):
        try:
            spec.params.model_validate(params)
        except ValidationError as exc:
            problems.extend(format_errors(exc, [*where, "params"]))
    return problems


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
