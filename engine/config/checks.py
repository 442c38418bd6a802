"""Checks of a ``routing.toml`` that a single pydantic field cannot make, and
the lines they report: one ``key = value: reason`` per problem, secrets hidden.

Also the connection settings that come from the environment
(``AUTOGLM_NATS_*``), since they are checked the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from engine.contracts.errors import ConfigError

if TYPE_CHECKING:
    from engine.config.models import NatsConfig

NATS_URL_ENV = "AUTOGLM_NATS_URL"
#: The connection's inbox prefix (``nats.inbox_prefix``); ``--secure`` writes
#: one per user into its env file.
INBOX_PREFIX_ENV = "AUTOGLM_NATS_INBOX_PREFIX"
_INBOX_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
M = TypeVar("M", bound=BaseModel)


def _key(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _value(v: object) -> str:
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
        return f"must be {_CMP[kind]} {_value(ctx.get(_CMP_CTX[kind]))}"
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
            lines.append(f"{key} = {_value(given)}: {_reason(err)}")
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
    TOML so they are reported together with every other bad key."""
    from processors.registry import REGISTRY

    if not isinstance(raw_routes, list | tuple):
        return []
    problems: list[str] = []
    for i, route in enumerate(raw_routes):
        if not isinstance(route, Mapping) or not isinstance(route.get("processor"), str):
            continue
        name, modality = route["processor"], route.get("modality")
        spec = REGISTRY.get(name)
        if spec is None:
            problems.append(
                f"routes[{i}].processor = {_value(name)}: unknown processor "
                f"(known: {', '.join(sorted(REGISTRY))})"
            )
            continue
        if spec.modality is not None and modality in ("image", "audio", "text") and spec.modality != modality:
            problems.append(
                f"routes[{i}].processor = {_value(name)}: handles {spec.modality}, not {modality}"
            )
        params = route.get("params", {})
        if isinstance(params, Mapping):
            try:
                spec.params.model_validate(params)
            except ValidationError as exc:
                problems.extend(format_errors(exc, ["routes", i, "params"]))
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


#: Environment variables for the connection's identity and TLS (containers,
#: secrets managers), over the file's ``[nats.auth]`` / ``[nats.tls]``.
AUTH_ENV = {
    "AUTOGLM_NATS_USER": ("auth", "user"),
    "AUTOGLM_NATS_PASSWORD": ("auth", "password"),
    "AUTOGLM_NATS_TOKEN": ("auth", "token"),
    "AUTOGLM_NATS_NKEY_SEED_FILE": ("auth", "nkey_seed_file"),
    "AUTOGLM_NATS_CREDS_FILE": ("auth", "creds_file"),
    "AUTOGLM_NATS_TLS_CA": ("tls", "ca"),
    "AUTOGLM_NATS_TLS_CERT": ("tls", "cert"),
    "AUTOGLM_NATS_TLS_KEY": ("tls", "key"),
    "AUTOGLM_NATS_TLS_HOSTNAME": ("tls", "hostname"),
}


def nats_from_env(nats: NatsConfig, env: Mapping[str, str]) -> NatsConfig:
    """``nats`` with ``AUTOGLM_NATS_URL``, ``AUTOGLM_NATS_INBOX_PREFIX`` and
    the ``AUTH_ENV`` variables applied (:func:`nats_problems` checks them)."""
    update: dict[str, Any] = {}
    if env.get(NATS_URL_ENV):
        update["url"] = env[NATS_URL_ENV]
    if env.get(INBOX_PREFIX_ENV):
        update["inbox_prefix"] = env[INBOX_PREFIX_ENV]
    for section in ("auth", "tls"):
        values = {key: env[var] for var, (sec, key) in AUTH_ENV.items() if sec == section and env.get(var)}
        if values:
            update[section] = updated(getattr(nats, section), values, ("env", section))
    return updated(nats, update, ("env",)) if update else nats


def nats_problems(nats: NatsConfig, where: str = "nats") -> list[str]:
    """Cross-field checks of auth and TLS; the messages never hold a secret."""
    a, t = nats.auth, nats.tls
    problems = []
    methods = [
        name
        for name, on in (
            ("password", bool(a.password.get_secret_value())),
            ("token", bool(a.token.get_secret_value())),
            ("nkey_seed_file", bool(a.nkey_seed_file)),
            ("creds_file", bool(a.creds_file)),
        )
        if on
    ]
    if len(methods) > 1:
        problems.append(f"{where}.auth: give one way to authenticate, not {' and '.join(methods)}")
    if a.password.get_secret_value() and not a.user:
        problems.append(f"{where}.auth.user: is required with a password")
    if bool(t.cert) != bool(t.key):
        problems.append(f"{where}.tls: cert and key go together (mutual TLS)")
    if not _INBOX_RE.fullmatch(nats.inbox_prefix):
        problems.append(
            f"{where}.inbox_prefix = {_value(nats.inbox_prefix)}: must be dot-separated tokens of "
            "[A-Za-z0-9_-] (no wildcards)"
        )
    for key, path in (
        ("auth.nkey_seed_file", a.nkey_seed_file),
        ("auth.creds_file", a.creds_file),
        ("tls.ca", t.ca),
        ("tls.cert", t.cert),
        ("tls.key", t.key),
        ("server_config", nats.server_config),
    ):
        if path and not Path(path).is_file():
            problems.append(f"{where}.{key} = {_value(path)}: file not found")
    return problems
