"""A NATS operator, account and user made here (decentralised JWT auth), for the .creds test.

What `nsc` would write, built from the nkeys library: JWTs signed with
ed25519 NKeys, a server config that trusts the operator and preloads the
account, and a ``.creds`` file holding the user's JWT and seed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import nkeys


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _keypair(prefix: int) -> tuple[bytes, Any, str]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    kp = nkeys.from_seed(bytearray(seed))
    return seed, kp, kp.public_key.decode()


def _jwt(claims: dict[str, Any], signer: Any) -> str:
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = dict(claims, iat=int(time.time()))
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    payload = _b64(json.dumps(body).encode())
    return f"{header}.{payload}.{_b64(signer.sign(f'{header}.{payload}'.encode()))}"


def operator_setup(directory: Path) -> tuple[Path, Path]:
    """Write ``server.conf`` (operator mode, memory resolver) and ``user.creds``."""
    _, op, op_pub = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, acct, acct_pub = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, _, user_pub = _keypair(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "conn": -1, "leaf": -1}
    op_jwt = _jwt(
        {"iss": op_pub, "sub": op_pub, "name": "test", "nats": {"type": "operator", "version": 2}}, op
    )
    acct_claims = {"type": "account", "version": 2, "limits": {**unlimited, "wildcards": True}}
    acct_jwt = _jwt({"iss": op_pub, "sub": acct_pub, "name": "A", "nats": acct_claims}, op)
    user_claims = {"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
    user_jwt = _jwt({"iss": acct_pub, "sub": user_pub, "name": "engine", "nats": user_claims}, acct)
    conf = directory / "operator.conf"
    conf.write_text(
        f'operator: "{op_jwt}"\nresolver: MEMORY\nresolver_preload: {{\n  {acct_pub}: "{acct_jwt}"\n}}\n'
    )
    creds = directory / "user.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return conf, creds
