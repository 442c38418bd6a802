"""Access control against real servers: --secure users, wrong passwords, permissions, TLS, NKeys."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
import orjson
import pytest
import trustme
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError

from engine.config.models import EngineConfig, NatsConfig, nats_from_env, parse_config
from engine.contracts.errors import ConfigError, TransportError
from engine.runtime.engine import Engine
from engine.runtime.server import EmbeddedServer
from engine.tools.publish import connect, sync_with_server
from engine.transport.security import connect_kwargs, read_env_file, redact_url
from engine.transport.streams import stream_names
from engine.wire.claimcheck import OBJECT_REF, put_payload
from tests.conftest import ROOT, Collector, collect, eventually, make_config, send
from tests.natsjwt import operator_setup
from tests.test_claimcheck import rewrite_object


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
        sys.executable, "-m", "engine.tools.cli", "publish", "--nats-url", url, "--prefix", prefix,
        "--source", "cam", "--text", "hi", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


@dataclass
class Secure:
    """An ``autoglm run --secure`` engine in its own process, shared by the tests below."""

    url: str
    files: Path  # <data_dir>/secure
    config: Path
    prefix: str
    banner: list[str]
    in_stream: str
    out_stream: str
    bucket: str = "autoglm-payloads"
    consumer: str = "autoglm-engine"

    def login(self, user: str) -> dict[str, Any]:
        """``user``'s connect arguments, read from its env file as the tools read it."""
        env = read_env_file(self.files / f"{user}.env")
        return connect_kwargs(nats_from_env(NatsConfig(), env))


@pytest.fixture(scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secure]:
    root = tmp_path_factory.mktemp("secure")
    prefix = "sec"
    cfg = root / "r.toml"
    cfg.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\ndata_dir = "{root / "data"}"\n'
        "[aligner]\nwindow_ms = 100\nidle_timeout_ms = 300\n"
        '[[routes]]\nmodality = "text"\nprocessor = "passthrough"\n'
        '[[routes]]\nmodality = "image"\nprocessor = "passthrough"\n'
    )
    with (root / "engine.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.tools.cli", "run", "--config", str(cfg), "--secure",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=log,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = [(await asyncio.wait_for(proc.stdout.readline(), 60)).decode() for _ in range(3)]
        assert "engine running" in banner[0], (banner, (root / "engine.log").read_text())
        url = next(w for w in banner[2].split() if w.startswith("nats://"))
        in_stream, out_stream = stream_names(NatsConfig(subject_prefix=prefix))
        yield Secure(url, root / "data" / "secure", cfg, prefix, banner, in_stream, out_stream)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, (root / "engine.log").read_text()


class Refusals:
    """A connection's error callback: what the server refused it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def cb(self, exc: Exception) -> None:
        self.seen.append(str(exc).lower())

    def missing(self, action: str, subjects: list[str]) -> list[str]:
        """Those of ``subjects`` the server did *not* refuse ``action`` (publish, subscription) on."""
        text = " ".join(self.seen)
        return [s for s in subjects if f'permissions violation for {action} to "{s.lower()}"' not in text]


async def as_user(secure: Secure, user: str) -> tuple[Any, Refusals]:
    refusals = Refusals()
    return await connect(secure.url, error_cb=refusals.cb, **secure.login(user)), refusals


async def attempt(nc: Any, publish: Sequence[str] = (), subscribe: Sequence[str] = ()) -> None:
    """Each request as a client library sends it (on the API subject, the
    reply to its inbox) and each subscription, then a round trip, so the
    server has answered every one."""
    for subject in publish:
        await nc.publish(subject, b"{}", reply=nc.new_inbox())
    for subject in subscribe:
        await nc.subscribe(subject)
    await sync_with_server(nc)


async def test_secure_run_refuses_strangers_and_confines_each_user(secure: Secure) -> None:
    url, prefix = secure.url, secure.prefix
    assert "anonymous clients are refused" in secure.banner[1]
    for name in ("server.conf", "producer.env", "engine.env", "reader.env"):
        assert stat.S_IMODE(os.stat(secure.files / name).st_mode) == 0o600, name
    for user in ("producer", "engine", "reader"):
        assert read_env_file(secure.files / f"{user}.env")["AUTOGLM_NATS_INBOX_PREFIX"] == f"_INBOX_{user}"

    await _refused_login(url)  # anonymous
    await _refused_login(url, user="producer", password="wrong")

    pub, pub_refused = await as_user(secure, "producer")
    snooped = Collector()
    await pub.subscribe(f"{prefix}.out.>", cb=snooped.cb)  # the server refuses this
    sub, _ = await as_user(secure, "reader")
    results = Collector()
    await sub.subscribe(f"{prefix}.out.>", cb=results.cb)
    await sync_with_server(sub)
    await send(pub, prefix, "cam", "text", b"hello", time.time_ns(), event_id="s1")
    await pub.publish(f"{prefix}.out.cam", b'{"forged": true}')  # not allowed either
    await sync_with_server(pub)
    [record] = await results.wait_for(1)
    assert record["events"] == {"text": ["s1"]}
    # its permissions are enough for a claim check into the engine's bucket
    ref = await put_payload(pub.jetstream(), secure.bucket, b"y" * 300_000, "image/png")
    await send(
        pub, prefix, "cam", "image", ref.encode(), time.time_ns(), content_type=OBJECT_REF, event_id="big"
    )
    records = await results.wait_for(2)
    assert records[1]["events"] == {"image": ["big"]} and records[1]["features"]["image"]["bytes"] == 300_000
    await sync_with_server(pub)
    assert snooped.items == []  # the producer cannot read results ...
    assert len(results.items) == 2  # ... nor forge them
    assert pub_refused.missing("subscription", [f"{prefix}.out.>"]) == []
    assert pub_refused.missing("publish", [f"{prefix}.out.cam"]) == []
    await pub.close()
    await sub.close()
    # `autoglm publish` with the producer's file works, claim check included, and
    # says plainly that it cannot --wait
    producer_file = str(secure.files / "producer.env")
    code, out, err = await publish_cli(url, prefix, "--auth-file", producer_file, "--wait", "2")
    assert code == 0, err
    assert "may not read results" in out and "published 1 text event" in out
    code, out, err = await publish_cli(url, prefix, "--auth-file", producer_file, "--claim-check")
    assert code == 0 and "(claim check)" in out, err
    # without it, refused, and the message says why (not just "no servers")
    code, out, err = await publish_cli(url, prefix)
    assert code == 1 and any(r in err for r in REFUSED), err
    # the tools, with the engine's file, over the engine's own inbox
    engine_file = str(secure.files / "engine.env")
    code, out = await _autoglm("status", "--once", "--nats-url", url, "--auth-file", engine_file)
    assert code == 0 and prefix in out, out
    code, out = await _autoglm("reload", "--nats-url", url, "--auth-file", engine_file)
    assert code == 0 and "applied" in out, out
    code, out = await _autoglm("health", "--config", str(secure.config))  # finds the --secure files itself
    assert code == 0 and "ok" in out, out


async def test_secure_users_cannot_read_each_others_replies(secure: Secure) -> None:
    """Replies travel on the asker's inbox: JetStream's deliveries to the
    engine (every producer's events, claim-check chunks), PubAcks, the
    reader's fetches, ``$SRV`` and ``<prefix>.svc`` answers. Each user may
    subscribe to its own inbox prefix only."""
    prefix = secure.prefix
    pub, pub_refused = await as_user(secure, "producer")
    reader, reader_refused = await as_user(secure, "reader")
    snooped = Collector()
    others = {
        "producer": ["_INBOX.>", "_INBOX_engine.>", "_INBOX_reader.>", ">"],
        "reader": ["_INBOX.>", "_INBOX_engine.>", "_INBOX_producer.>", ">"],
    }
    for nc, user in ((pub, "producer"), (reader, "reader")):
        for subject in others[user]:
            await nc.subscribe(subject, cb=snooped.cb)
        await sync_with_server(nc)
    assert pub_refused.missing("subscription", others["producer"]) == []
    assert reader_refused.missing("subscription", others["reader"]) == []
    # traffic that went by on _INBOX.> before: the engine fetching an event and
    # a claim check, the producer's PubAcks, the reader's own consumer, the tools
    results = await collect(reader, f"{prefix}.out.cam-inbox")
    ref = await put_payload(pub.jetstream(), secure.bucket, b"private words", "text/plain")
    await send(pub, prefix, "cam-inbox", "text", ref.encode(), time.time_ns(), OBJECT_REF, "i1")
    [record] = await results.wait_for(1)
    assert record["events"] == {"text": ["i1"]}
    mine = await reader.jetstream().pull_subscribe(f"{prefix}.out.cam-inbox", stream=secure.out_stream)
    [msg] = await mine.fetch(1, timeout=5)
    await msg.ack()
    engine_file = str(secure.files / "engine.env")
    code, out = await _autoglm("status", "--once", "--nats-url", secure.url, "--auth-file", engine_file)
    assert code == 0 and prefix in out, out
    await sync_with_server(pub)
    await sync_with_server(reader)
    assert snooped.items == []
    await pub.close()
    await reader.close()


async def test_secure_producer_can_neither_read_nor_erase_objects(secure: Secure) -> None:
    prefix, bucket = secure.prefix, secure.bucket
    stream = f"OBJ_{bucket}"
    pub, refused = await as_user(secure, "producer")
    js = pub.jetstream(timeout=1)
    victim = await put_payload(js, bucket, b"the victim's words", "text/plain")  # a put needs no read
    meta = f"$O.{bucket}.M.{base64.urlsafe_b64encode(victim.name.encode()).decode()}"
    reads_and_erasures = [
        f"$JS.API.STREAM.INFO.{stream}",  # (object_store(), get_info: the lookup of every read)
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.{meta}",
        f"$JS.API.CONSUMER.CREATE.{stream}.peek.$O.{bucket}.C.>",  # get(): a consumer on the chunks
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.STREAM.PURGE.{stream}",
        f"$JS.API.STREAM.MSG.DELETE.{stream}",
        f"$JS.API.STREAM.DELETE.{stream}",
        f"$JS.API.STREAM.UPDATE.{stream}",
    ]
    await attempt(pub, publish=reads_and_erasures, subscribe=[f"$O.{bucket}.>", f"$O.{bucket}.M.*"])
    assert refused.missing("publish", reads_and_erasures) == []
    assert refused.missing("subscription", [f"$O.{bucket}.>", f"$O.{bucket}.M.*"]) == []
    with pytest.raises(NatsTimeoutError):  # and so nats-py's own read gets nothing back
        await js.get_last_msg(stream, meta)
    # a rollup would erase every object (all) or another object's chunks (sub): the bucket refuses it
    for rollup in ("all", "sub"):
        with pytest.raises(APIError, match="rollup not permitted"):
            await js.publish(meta, b"{}", headers={"Nats-Rollup": rollup})
    # what a producer can still do, knowing a name: publish newer metadata and
    # other bytes under it. The engine refuses the result.
    await rewrite_object(js, bucket, victim.name, b"an attacker's words, as if the victim's")
    reader, _ = await as_user(secure, "reader")
    dlq = await collect(reader, f"{prefix}.dlq.cam-objects")
    await send(pub, prefix, "cam-objects", "text", victim.encode(), time.time_ns(), OBJECT_REF, "o1")
    [record] = await dlq.wait_for(1)
    assert (record["event_id"], record["reason"]) == ("o1", "object_tampered"), record
    await pub.close()
    await reader.close()


async def test_secure_monitor_reads_as_the_reader_on_loopback(secure: Secure) -> None:
    """``autoglm monitor --secure`` finds the reader's credentials beside the
    engine's data, asks ``$SRV.STATS`` and reads results; it serves on
    loopback; the reader still may not reach an engine's endpoints."""
    import httpx

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.tools.cli", "monitor", "--config", str(secure.config), "--secure",
        "--port", "0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("autoglm monitor: http://127.0.0.1:"), (line, await proc.stderr.read())
        url = line.split()[2]
        pub, _ = await as_user(secure, "producer")
        async with httpx.AsyncClient(base_url=url) as http:

            async def engine_and_card() -> bool:
                await send(pub, secure.prefix, "cam-mon", "text", b"watched", time.time_ns())
                state = (await http.get("/api/state")).json()
                cards = {c["name"]: c for c in state["cards"]}
                engines = [e["prefix"] for e in state["overview"]["engines"]]
                return engines == [secure.prefix] and cards.get("cam-mon", {}).get("results", 0) > 0

            await eventually(engine_and_card, "the engine's stats and a result on the secure monitor")
            assert (await http.get("/frame/cam-mon")).status_code == 404  # the reader reads no inputs
        await pub.close()
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    reader, refused = await as_user(secure, "reader")
    endpoints = [f"{secure.prefix}.svc.config", f"{secure.prefix}.svc.reload.x", "$SRV.STATS"]
    await attempt(reader, publish=endpoints)
    assert refused.missing("publish", endpoints) == []
    await reader.close()


async def test_secure_reader_reads_results_and_nothing_else(secure: Secure) -> None:
    prefix, ins, outs = secure.prefix, secure.in_stream, secure.out_stream
    reader, refused = await as_user(secure, "reader")
    harmful = [
        f"$JS.API.CONSUMER.DELETE.{ins}.{secure.consumer}",  # the engine's durable consumer
        f"$JS.API.STREAM.PURGE.{outs}",
        f"$JS.API.STREAM.PURGE.{ins}",
        f"$JS.API.STREAM.DELETE.{ins}",
        f"$JS.API.STREAM.DELETE.{outs}",
        f"$JS.API.STREAM.UPDATE.{outs}",
        f"$JS.API.STREAM.MSG.DELETE.{outs}",
        f"$JS.API.STREAM.MSG.GET.{ins}",  # reading the inputs
        f"$JS.API.DIRECT.GET.{ins}",
        f"$JS.API.CONSUMER.CREATE.{ins}.peek.{prefix}.in.>",
        f"$JS.API.CONSUMER.CREATE.{ins}",
        f"$JS.API.CONSUMER.MSG.NEXT.{ins}.{secure.consumer}",
        f"$JS.ACK.{ins}.{secure.consumer}.1.1.1.1.0",
        f"{prefix}.in.cam.text",
    ]
    await attempt(reader, publish=harmful, subscribe=[f"{prefix}.in.>"])
    assert refused.missing("publish", harmful) == []
    assert refused.missing("subscription", [f"{prefix}.in.>"]) == []
    with pytest.raises(NatsTimeoutError):  # nats-py's own call gets nothing back either
        await reader.jetstream(timeout=1).delete_consumer(ins, secure.consumer)

    # everything still there, and still working: one event in, its result read
    # by a plain subscription, by the reader's own durable consumer, by sequence
    engine, _ = await as_user(secure, "engine")
    ejs = engine.jetstream()
    assert (await ejs.consumer_info(ins, secure.consumer)).name == secure.consumer
    plain = await collect(reader, f"{prefix}.out.cam-reader")
    pub, _ = await as_user(secure, "producer")
    await send(pub, prefix, "cam-reader", "text", b"for the reader", time.time_ns(), event_id="r1")
    [record] = await plain.wait_for(1)
    assert record["events"] == {"text": ["r1"]}
    rjs = reader.jetstream()
    mine = await rjs.pull_subscribe(f"{prefix}.out.cam-reader", durable="reader-1", stream=outs)
    [msg] = await mine.fetch(1, timeout=5)
    assert orjson.loads(msg.data)["events"] == {"text": ["r1"]}
    await msg.ack_sync()
    assert (await rjs.get_msg(outs, msg.metadata.sequence.stream)).data == msg.data
    await ejs.stream_info(ins)  # not deleted
    assert (await ejs.stream_info(outs)).state.messages >= 1  # not purged
    for nc in (reader, engine, pub):
        await nc.close()


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
        sys.executable, "-m", "engine.tools.cli", "--log-level", "DEBUG", *args,
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
            sys.executable, "-m", "engine.tools.cli", "--log-level", "DEBUG", "run",
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


async def test_secure_producer_and_reader_through_the_sdk(secure: Secure) -> None:
    """The Producer as --secure's producer (no JetStream API: it finds the mode
    by publishing) and Results as its reader (no stream lookup: it reads the
    results stream by the engine's naming, through a durable of its own)."""
    from engine.sources import Producer, Results

    async with Producer(
        secure.url, source="sdk-sec", prefix=secure.prefix, connect_opts=secure.login("producer")
    ) as p:
        eid = await p.text("from the sdk")
    assert p.durable is True
    reader = Results(
        secure.url, sources=["sdk-sec"], prefix=secure.prefix, durable="sdk-reader",
        from_start=True, connect_opts=secure.login("reader"),
    )  # fmt: skip
    async with reader:
        record = await asyncio.wait_for(anext(aiter(reader)), 20)
    assert record.source == "sdk-sec" and record.events == {"text": [eid]}  # type: ignore[union-attr]
