"""Access control against real servers: --secure users, wrong passwords, permissions, TLS, NKeys."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

import nkeys
import orjson
import pytest
import trustme

from engine.app import Engine
from engine.claimcheck import OBJECT_REF, put_payload
from engine.config import EngineConfig, parse_config
from engine.errors import ConfigError, TransportError
from engine.publish import connect, sync_with_server
from engine.security import connect_kwargs, read_env_file, redact_url
from engine.server import EmbeddedServer
from tests.conftest import ROOT, Collector, collect, make_config, send, spawn_engine
from tests.natsjwt import operator_setup


def test_auth_from_environment_and_secrets_never_shown() -> None:
    env = {
        "AUTOGLM_NATS_USER": "cam",
        "AUTOGLM_NATS_PASSWORD": "s3cret-pw",
        "AUTOGLM_NATS_INBOX_PREFIX": "_INBOX_cam",
    }
    cfg = parse_config({"routes": [{"modality": "text", "processor": "passthrough"}]}, env=env)
    assert cfg.nats.auth.user == "cam" and cfg.nats.auth.password.get_secret_value() == "s3cret-pw"
    assert "s3cret-pw" not in cfg.model_dump_json() and "s3cret-pw" not in repr(cfg)
    kwargs = connect_kwargs(cfg.nats)
    assert kwargs["user"] == "cam" and kwargs["password"] == "s3cret-pw" and "tls" not in kwargs
    assert kwargs["inbox_prefix"] == cfg.nats.inbox_prefix == "_INBOX_cam"  # for nats.connect and the broker


async def test_the_engine_and_its_jetstream_use_the_configured_inbox_prefix(
    nc: Any, nats_url: str, prefix: str
) -> None:
    """Every reply to the engine (its fetches, object chunks, requests) arrives
    under ``nats.inbox_prefix``: a server can then confine it there."""
    seen: list[bytes] = []

    async def on_reply(msg: Any) -> None:
        seen.append(msg.data)

    await nc.subscribe("_INBOX_mine.>", cb=on_reply)
    await sync_with_server(nc)
    cfg = make_config(prefix, nats={"subject_prefix": prefix, "inbox_prefix": "_INBOX_mine"})
    assert (await one_result(nats_url, cfg, "p1"))["events"] == {"text": ["p1"]}
    await sync_with_server(nc)
    assert b"hello" in seen  # the event, as JetStream delivered it to the engine's fetch


@pytest.mark.parametrize(
    ("nats", "problem"),
    [
        ({"auth": {"token": "t", "user": "u", "password": "p"}}, "nats.auth: give one way to authenticate"),
        ({"auth": {"password": "p"}}, "nats.auth.user: is required with a password"),
        ({"tls": {"cert": "/etc/hostname"}}, "nats.tls: cert and key go together"),
        ({"tls": {"ca": "/nope/ca.pem"}}, 'nats.tls.ca = "/nope/ca.pem": file not found'),
        ({"auth": {"password": 12345}}, "nats.auth.password = (hidden): "),
        ({"inbox_prefix": "_INBOX.>"}, 'nats.inbox_prefix = "_INBOX.>": must be dot-separated tokens'),
    ],
)
def test_bad_auth_settings_are_named_without_their_secrets(nats: dict[str, Any], problem: str) -> None:
    data = {"nats": nats, "routes": [{"modality": "text", "processor": "passthrough"}]}
    with pytest.raises(ConfigError) as err:
        parse_config(data, env={})
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems
    assert "12345" not in str(err.value.problems)


async def _refused(url: str, **kwargs: Any) -> str:
    with pytest.raises(TransportError) as err:
        nc = await connect(url, **kwargs)
        await nc.close()
    return str(err.value)


# The server answers a failed login with -ERR 'Authorization Violation' and
# closes; now and then the client reads the reset before the -ERR (a TCP race
# on loopback). Either way the connection is refused.
REFUSED = ("Authorization Violation", "Connection reset by peer")


async def _refused_login(url: str, **kwargs: Any) -> None:
    message = await _refused(url, **kwargs)
    assert any(r in message for r in REFUSED), message


async def publish_cli(url: str, prefix: str, *extra: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "publish", "--nats-url", url, "--prefix", prefix,
        "--source", "cam", "--text", "hi", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_secure_run_refuses_strangers_and_confines_each_user(tmp_path: Path) -> None:
    prefix = "sec"
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\ndata_dir = "{tmp_path / "data"}"\n'
        "[aligner]\nwindow_ms = 100\nidle_timeout_ms = 300\n"
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
        '[[routes]]\nmodality = "image"\nprocessor = "passthrough"\n'
    )
    engine = await spawn_engine("--config", str(cfg), "--secure")
    try:
        assert engine.stdout is not None
        banner = (await asyncio.wait_for(engine.stdout.readline(), 10)).decode()
        assert "anonymous clients are refused" in banner
        banner = (await asyncio.wait_for(engine.stdout.readline(), 10)).decode()  # how to publish
        url = next(w for w in banner.split() if w.startswith("nats://"))
        secure = tmp_path / "data" / "secure"
        for name in ("server.conf", "producer.env", "engine.env", "reader.env"):
            assert stat.S_IMODE(os.stat(secure / name).st_mode) == 0o600, name
        producer = read_env_file(secure / "producer.env")
        reader = read_env_file(secure / "reader.env")

        await _refused_login(url)  # anonymous
        await _refused_login(url, user="producer", password="wrong")

        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        pub = await connect(
            url, user="producer", password=producer["AUTOGLM_NATS_PASSWORD"], error_cb=on_error
        )
        snooped = Collector()
        await pub.subscribe(f"{prefix}.out.>", cb=snooped.cb)  # the server refuses this
        sub = await connect(url, user="reader", password=reader["AUTOGLM_NATS_PASSWORD"])
        results = Collector()
        await sub.subscribe(f"{prefix}.out.>", cb=results.cb)
        await sync_with_server(sub)
        await send(pub, prefix, "cam", "text", b"hello", time.time_ns(), event_id="s1")
        await pub.publish(f"{prefix}.out.cam", b'{"forged": true}')  # not allowed either
        await pub.flush()
        [record] = await results.wait_for(1)
        assert record["events"] == {"text": ["s1"]}
        # its permissions are enough for a claim check into the engine's bucket
        ref = await put_payload(pub.jetstream(), "autoglm-payloads", b"y" * 300_000, "image/png")
        await send(
            pub, prefix, "cam", "image", ref.encode(), time.time_ns(), content_type=OBJECT_REF, event_id="big"
        )
        records = await results.wait_for(2)
        assert (
            records[1]["events"] == {"image": ["big"]} and records[1]["features"]["image"]["bytes"] == 300_000
        )
        await asyncio.sleep(0.3)
        assert snooped.items == []  # the producer cannot read results ...
        assert len(results.items) == 2  # ... nor forge them
        violations = " ".join(str(e) for e in errors).lower()
        assert f'permissions violation for subscription to "{prefix}.out.>"' in violations
        assert f'permissions violation for publish to "{prefix}.out.cam"' in violations
        await pub.close()
        await sub.close()
        # `autoglm publish` with the producer's file works, and says plainly that it cannot --wait
        code, out, err = await publish_cli(
            url, prefix, "--auth-file", str(secure / "producer.env"), "--wait", "2"
        )
        assert code == 0, err
        assert "may not read results" in out and "published 1 text event" in out
        # without it, refused, and the message says why (not just "no servers")
        code, out, err = await publish_cli(url, prefix)
        assert code == 1 and any(r in err for r in REFUSED), err
    finally:
        engine.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(engine.wait(), 30) == 0


async def one_result(url: str, cfg: EngineConfig, event_id: str) -> Any:
    """An engine and a client, both connecting with ``cfg.nats``: one text event in, its result."""
    prefix = cfg.nats.subject_prefix
    engine = Engine(cfg)
    await engine.start(url)
    nc = await connect(url, **connect_kwargs(cfg.nats))
    try:
        out = await collect(nc, f"{prefix}.out.>")
        await send(nc, prefix, "cam", "text", b"hello", time.time_ns(), event_id=event_id)
        [record] = await out.wait_for(1)
        return record
    finally:
        await nc.close()
        await engine.stop()


@pytest.fixture
def tls_server(tmp_path: Path) -> Any:
    """A nats-server that requires TLS with a client certificate, from a CA the test makes."""
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("engine.autoglm.test")
    files = {
        name: tmp_path / f"{name}.pem" for name in ("ca", "server", "server_key", "client", "client_key")
    }
    ca.cert_pem.write_to_path(files["ca"])
    server_cert.cert_chain_pems[0].write_to_path(files["server"])
    server_cert.private_key_pem.write_to_path(files["server_key"])
    client_cert.cert_chain_pems[0].write_to_path(files["client"])
    client_cert.private_key_pem.write_to_path(files["client_key"])
    conf = tmp_path / "tls.conf"
    conf.write_text(
        f'tls {{\n  cert_file: "{files["server"]}"\n  key_file: "{files["server_key"]}"\n'
        f'  ca_file: "{files["ca"]}"\n  verify: true\n  timeout: 2\n}}\n'
    )
    server = EmbeddedServer(tmp_path / "js", extra_args=["-c", str(conf)])
    server.start()
    yield server.url, files
    server.stop()


async def test_engine_over_mutual_tls_with_a_test_made_ca(tls_server: Any) -> None:
    url, files = tls_server
    prefix = "tls"
    tls = {"ca": str(files["ca"]), "cert": str(files["client"]), "key": str(files["client_key"])}
    cfg = make_config(prefix, nats={"subject_prefix": prefix, "tls": tls})
    assert "Secure" not in await _refused(url)  # plain client: the server wants TLS
    no_client_cert = make_config(prefix, nats={"subject_prefix": prefix, "tls": {"ca": str(files["ca"])}})
    await _refused(url, **connect_kwargs(no_client_cert.nats))  # verify = true: no cert, no entry
    record = await one_result(url, cfg, "t1")
    assert record["events"] == {"text": ["t1"]}


async def test_engine_authenticates_with_an_nkey(tmp_path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "engine.nk"
    seed_file.write_bytes(seed)
    conf = tmp_path / "nkey.conf"
    conf.write_text(f'authorization {{\n  users = [ {{ nkey: "{public}" }} ]\n}}\n')
    server = EmbeddedServer(tmp_path / "js", extra_args=["-c", str(conf)])
    url = await asyncio.to_thread(server.start)
    try:
        await _refused(url)  # no NKey: no entry
        prefix = "nk"
        cfg = make_config(prefix, nats={"subject_prefix": prefix, "auth": {"nkey_seed_file": str(seed_file)}})
        engine = Engine(cfg)
        await engine.start(url)
        nc = await connect(url, **connect_kwargs(cfg.nats))
        reply = await nc.request(f"{prefix}.svc.health", b"", timeout=5)
        assert orjson.loads(reply.data)["status"] == "ok"
        await nc.close()
        await engine.stop()
    finally:
        await asyncio.to_thread(server.stop)


async def test_engine_authenticates_with_a_creds_file(tmp_path: Path) -> None:
    conf, creds = operator_setup(tmp_path)
    server = EmbeddedServer(tmp_path / "js", jetstream=False, extra_args=["-c", str(conf)])
    url = await asyncio.to_thread(server.start)
    try:
        await _refused_login(url)
        prefix = "jwt"
        cfg = make_config(prefix, nats={"subject_prefix": prefix, "auth": {"creds_file": str(creds)}})
        record = await one_result(url, cfg, "j1")
        assert record["events"] == {"text": ["j1"]}
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://eng:S3cret@10.0.0.1:4222", "nats://***@10.0.0.1:4222"),
        ("tls://s3cret-token@nats.example:4443", "tls://***@nats.example:4443"),
        ("nats://eng:p@ss/w,rd@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),  # '@', '/', ',' inside
        ("eng:S3cret@127.0.0.1:4222", "***@127.0.0.1:4222"),  # no scheme
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ],
)
def test_redact_url_hides_any_user_info(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    # <prefix>.svc.config answers with the configuration as JSON: the URL in it is redacted
    routes = [{"modality": "text", "processor": "passthrough"}]
    cfg = parse_config({"routes": routes}, env={"AUTOGLM_NATS_URL": url})
    assert cfg.nats.url == url  # connecting still uses it whole
    assert orjson.loads(cfg.model_dump_json())["nats"]["url"] == shown


PASSWORD = "S3cretPassw0rd"


async def _autoglm(*args: str, timeout: float = 60) -> tuple[int, str]:
    """``autoglm --log-level DEBUG ARGS`` to its end: exit code, stdout and stderr together."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "--log-level", "DEBUG", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_password_in_the_nats_url_is_never_shown(tmp_path: Path) -> None:
    conf = tmp_path / "users.conf"
    conf.write_text(f'authorization {{\n  users = [ {{ user: "eng", password: "{PASSWORD}" }} ]\n}}\n')
    server = EmbeddedServer(tmp_path / "js", extra_args=["-c", str(conf)])
    plain = await asyncio.to_thread(server.start)
    prefix = "pw"
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\ndata_dir = "{tmp_path / "data"}"\nconnect_timeout_s = 1\n'
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
    )
    secret_url = plain.replace("nats://", f"nats://eng:{PASSWORD}@")
    dead_url = f"nats://eng:{PASSWORD}@127.0.0.1:{_dead_port()}"
    shown: list[str] = []
    try:
        engine = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", "--log-level", "DEBUG", "run",
            "--config", str(cfg), "--nats-url", secret_url,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            assert engine.stdout is not None
            while b"engine running" not in (line := await asyncio.wait_for(engine.stdout.readline(), 60)):
                assert line, "the engine exited before it ran"
                shown.append(line.decode())
            shown.append(line.decode())
            assert f"engine running on nats://***@{plain.removeprefix('nats://')}" in shown[-1]
            # what the engine tells others about itself: its configuration, the tools' output
            nc = await connect(secret_url)
            reply = await nc.request(f"{prefix}.svc.config", b"", timeout=5)
            await nc.close()
            assert PASSWORD not in reply.data.decode()
            for tool in (["status", "--once"], ["health", "--config", str(cfg)], ["reload"]):
                code, out = await _autoglm(*tool, "--nats-url", secret_url)
                assert code == 0, out
                shown.append(out)
        finally:
            engine.send_signal(signal.SIGTERM)
            rest, _ = await asyncio.wait_for(engine.communicate(), 30)
            shown.append(rest.decode())
        assert engine.returncode == 0, shown
        # a server that is not there: every command says so, without the password
        for command in (
            ["run", "--config", str(cfg)],
            ["publish", "--source", "cam", "--text", "hi"],
            ["status", "--once"],
            ["health"],
            ["reload"],
        ):
            code, out = await _autoglm(*command, "--nats-url", dead_url)
            assert code != 0 and "nats://***@127.0.0.1:" in out, out
            shown.append(out)
    finally:
        await asyncio.to_thread(server.stop)
    assert PASSWORD not in "".join(shown)
