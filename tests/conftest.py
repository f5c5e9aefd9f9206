"""Fixtures shared by the integration tests: a real ``postroom serve`` on a loopback port.

The server runs as a subprocess with its own data directory and configuration, exactly as an
operator would run it; tests talk to it over real sockets and read its Maildirs and log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

POSTROOM = [sys.executable, "-m", "postroom"]

#: argon2 cost for tests: the lowest the library takes, so adding users is instant.
FAST_PASSWORDS = """
[passwords]
time_cost = 1
memory_cost_kib = 8
parallelism = 1
"""


#: Tests never ask the system's resolver: unless a test brings its own DNS server, MX lookups
#: go to a port on 127.0.0.1 where nothing listens, and remote mail stays deferred.
NO_DNS = """
[outbound]
nameservers = ["127.0.0.1"]
dns_port = 9
dns_timeout = 1.0
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0,
              host: str = "127.0.0.1") -> None:
    """Wait for the server's 220 banner: the port listens before the event loop (and its signal
    handlers) run, so an open port alone does not mean ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220 "):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not greet")


def wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Until no process of group *pgid* is still running (exited ones may linger as zombies
    until their new parent reaps them: they hold nothing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        with os.scandir("/proc") as entries:
            for entry in entries:
                if not entry.name.isdigit():
                    continue
                try:
                    fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                except (FileNotFoundError, ProcessLookupError, IndexError):
                    continue
                if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ..., pgrp
                    alive = True
                    break
        if not alive:
            return
        time.sleep(0.01)
    raise AssertionError(f"processes of group {pgid} still run")


@dataclass
class ServerHandle:
    root: Path
    port: int
    extra_config: str = ""
    server_extra: str = ""  # more keys for the [server] table
    host: str = "127.0.0.1"  # where the mx listener binds
    proc: subprocess.Popen[bytes] | None = None
    hostname: str = "mx.test.example"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def config_path(self) -> Path:
        return self.root / "postroom.toml"

    @property
    def log_path(self) -> Path:
        return self.root / "mail.log"

    def write_config(self) -> None:
        self.config_path.write_text(
            f"""
[server]
hostname = "{self.hostname}"
data_dir = "{self.data_dir}"
run_as = ""
log_file = "{self.log_path}"
{self.server_extra}

[[listener]]
address = "{self.host}:{self.port}"
{FAST_PASSWORDS}
{self.extra_config}
{"" if "[outbound]" in self.extra_config else NO_DNS}
"""
        )

    def cli(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [*POSTROOM, "-c", str(self.config_path), *args],
            input=stdin, capture_output=True, text=True, env={**os.environ, **self.env},
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"postroom {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*POSTROOM, "-c", str(self.config_path), "serve"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            start_new_session=True,  # its own process group: kill() reaches every process
        )
        wait_port(self.port, self.proc, host=self.host)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.proc = None

    def kill(self) -> None:
        """SIGKILL to every process of the server at once (supervisor, workers, queue
        manager), as a crash or a power cut would stop them."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        wait_group_gone(self.proc.pid)  # its locks and files are let go only then
        self.proc = None

    def maildir(self, address: str) -> Path:
        local, _, domain = address.partition("@")
        return self.data_dir / "mail" / domain / local

    def messages(self, address: str) -> list[bytes]:
        new = self.maildir(address) / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_for(self, predicate: object, timeout: float = 10.0) -> None:
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError("condition not reached in time")


def make_server(tmp_path: Path, extra_config: str = "", server_extra: str = "", *,
                host: str = "127.0.0.1", port: int | None = None,
                hostname: str = "mx.test.example") -> ServerHandle:
    handle = ServerHandle(root=tmp_path, port=port or free_port(), extra_config=extra_config,
                          server_extra=server_extra, host=host, hostname=hostname)
    tmp_path.mkdir(parents=True, exist_ok=True)
    handle.write_config()
    handle.cli("domain", "add", "example.com")
    handle.cli("user", "add", "alice@example.com", "--password-stdin", stdin="alice-secret\n")
    handle.cli("user", "add", "bob@example.com", "--password-stdin", stdin="bob-secret\n")
    return handle


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    """A running server: domain example.com, users alice and bob, no trusted networks."""
    handle = make_server(tmp_path)
    handle.start()
    try:
        yield handle
    finally:
        if handle.proc is not None:
            handle.stop()


@pytest.fixture
def relay_server(tmp_path: Path) -> Iterator[ServerHandle]:
    """Like ``server`` but 127.0.0.0/8 may relay."""
    handle = make_server(tmp_path, '[relay]\ntrusted_networks = ["127.0.0.0/8"]\n')
    handle.start()
    try:
        yield handle
    finally:
        if handle.proc is not None:
            handle.stop()
