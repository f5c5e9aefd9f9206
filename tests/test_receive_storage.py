"""Storage failures reach the client as the right reply, over a real socket.

The server is assembled in-process (the same parts ``postroom serve`` uses) with a fault-injecting
:class:`~postroom.queue.committer.Disk`: ENOSPC must answer ``452 4.3.1``, EIO ``451 4.3.0``, and
neither may leave a file behind or end the session.
"""

from __future__ import annotations

import asyncio
import errno
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from postroom import config as config_mod
from postroom.accounts.passwords import hash_password
from postroom.accounts.store import AccountStore
from postroom.daemon import receive_settings, tls_context
from postroom.delivery.maildir import MaildirUsage
from postroom.net.server import SmtpServer, bind_listener
from postroom.policy.router import Router
from postroom.queue.committer import Committer, Disk
from postroom.queue.spool import Spool
from postroom.receive import Receiver


class FailingDisk(Disk):
    def __init__(self) -> None:
        self.errno: int | None = None

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        if self.errno is not None:
            raise OSError(self.errno, "injected")
        super().write(fd, data)


@asynccontextmanager
async def running(tmp_path: Path, disk: Disk, role: str = "mx") -> AsyncIterator[tuple[int, Path]]:
    """The server's parts on this test's event loop (plain asyncio, not uvloop)."""
    cfg = config_mod.from_dict({
        "server": {"hostname": "mx.test.example", "data_dir": str(tmp_path / "data")},
        "listener": [{"address": "127.0.0.1:0", "role": role}],
        "passwords": {"time_cost": 1, "memory_cost_kib": 8, "parallelism": 1},
        "relay": {"trusted_networks": ["127.0.0.0/8"]},
    })
    store = AccountStore.for_config(cfg)
    store.add_domain("example.com")
    store.add_user("alice@example.com", hash_password("pw", cfg.passwords))
    usage = MaildirUsage()
    committer = Committer()
    committer.start()
    spool = Spool(cfg.data_dir, committer, usage, cfg.hostname, disk=disk)
    receiver = Receiver(receive_settings(cfg), Router(store, cfg.delivery, usage.usage,
                                                      cfg.data_dir), spool)
    server = SmtpServer(cfg, receiver, tls_context=tls_context(cfg))
    sock = bind_listener(cfg.listeners()[0])
    port = sock.getsockname()[1]
    await server.start([(sock, cfg.listeners()[0])])
    try:
        yield port, cfg.data_dir
    finally:
        await server.shutdown()
        await asyncio.to_thread(committer.stop)
        store.close()


def _send(port: int) -> list[tuple[int, bytes]]:
    results = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="c.test", timeout=10) as client:
        client.ehlo()
        for _ in range(2):
            client.mail("a@remote.example")
            client.rcpt("alice@example.com")
            code, text = client.data(b"Subject: s\r\n\r\nbody\r\n")
            results.append((code, text))
            if code != 250:
                client.rset()
    return results


@pytest.mark.parametrize(("err", "code", "enhanced"),
                         [(errno.ENOSPC, 452, b"4.3.1"), (errno.EIO, 451, b"4.3.0")])
def test_storage_failure_replies(tmp_path: Path, err: int, code: int, enhanced: bytes) -> None:
    disk = FailingDisk()

    async def scenario() -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]], Path]:
        async with running(tmp_path, disk) as (port, data_dir):
            disk.errno = err
            failed = await asyncio.to_thread(_send, port)
            disk.errno = None
            ok = await asyncio.to_thread(_send, port)
            return failed, ok, data_dir

    failed, ok, data_dir = asyncio.run(scenario())
    assert [(c, t[:5]) for c, t in failed] == [(code, enhanced)] * 2
    assert all(c == 250 for c, _ in ok)
    maildir = data_dir / "mail" / "example.com" / "alice"
    assert len(list((maildir / "new").iterdir())) == 2  # only the two accepted ones
    assert list((maildir / "tmp").iterdir()) == []  # nothing half-written left behind
    assert list((data_dir / "queue" / "active").iterdir()) == []
    assert list((data_dir / "queue" / "incoming").iterdir()) == []


def test_tls_on_plain_asyncio_keeps_what_the_client_sends_first(tmp_path: Path) -> None:
    """asyncio may hand the protocol its first decrypted bytes before ``start_tls`` returns:
    they must still be read, after the core knows TLS is up (and, on 465, after the banner)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def starttls(port: int) -> int:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="c.test", timeout=10) as client:
            client.starttls(context=ctx)
            refused = client.sendmail("a@remote.example", ["alice@example.com"],
                                      b"Subject: s\r\n\r\nbody\r\n")
            return 0 if refused else 250

    def implicit(port: int) -> int:
        with smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="c.test", timeout=10,
                              context=ctx) as client:
            return client.noop()[0]

    async def scenario(role: str, client: Callable[[int], int]) -> int:
        async with running(tmp_path / role, Disk(), role) as (port, _):
            return await asyncio.to_thread(client, port)

    assert asyncio.run(scenario("mx", starttls)) == 250
    assert asyncio.run(scenario("submissions", implicit)) == 250
