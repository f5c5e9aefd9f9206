"""A private Postfix instance for interop tests: its own main.cf/master.cf, queue, data
directory and log file, smtpd on a loopback address and a free port, virtual mailboxes in a
Maildir tree. The system's Postfix instance (/etc/postfix) is never started or touched.

Postfix's daemons run as the ``postfix`` user and its virtual(8) agent delivers as ``nobody``, so
everything lives in a directory under /tmp that they can traverse (pytest's ``tmp_path`` is
private to root). Starting needs root, as ``postfix start`` always does::

    reason = postfix_skip_reason()      # None when root and the binaries are there
    with running_postfix(host="127.0.0.3", mailboxes=["dave"]) as pf:
        pf.wait_log("status=sent")
        pf.messages("dave@pf.test")

No lookup reaches the system resolver: smtpd does no reverse lookups
(``smtpd_peername_lookup = no``), the smtp client uses getaddrinfo (``smtp_host_lookup =
native``, ``smtp_dns_support_level = disabled``) and is only ever given an IP literal as its next
hop (``relayhost = [127.0.0.1]:PORT``).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from postroom.net.tls import self_signed

BINARIES = ("postfix", "postconf", "sendmail")

#: Debian's master.cf without chroot or pipe services; the smtpd line is put in front of it.
_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_skip_reason() -> str | None:
    """Why a private Postfix cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root: postfix start runs its master as root"
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return f"Postfix is not installed (missing {', '.join(missing)})"
    daemon_dir = subprocess.run(["postconf", "-d", "-h", "daemon_directory"], capture_output=True,
                                text=True, timeout=30).stdout.strip()
    if not daemon_dir or not os.access(os.path.join(daemon_dir, "master"), os.X_OK):
        return f"Postfix's master daemon is missing from {daemon_dir or 'its daemon_directory'}"
    return None


def free_port_on(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass
class PostfixInstance:
    root: Path  # traversable by the postfix user and nobody
    host: str = "127.0.0.3"  # where smtpd listens
    port: int = 0
    hostname: str = "mx.pf.test"
    domain: str = "pf.test"  # a virtual mailbox domain: mail for it is delivered here
    mailboxes: list[str] = field(default_factory=lambda: ["dave"])
    relayhost: str = ""  # e.g. "[127.0.0.1]:2525": where everything else goes
    tls: bool = True  # STARTTLS offered by smtpd, used by smtp when offered ("may")
    master_pid: int | None = None

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def log_path(self) -> Path:
        return self.root / "maillog"

    @property
    def vmail(self) -> Path:
        return self.root / "vmail"

    def write_config(self) -> None:
        nobody = pwd.getpwnam("nobody")
        self.conf_dir.mkdir(parents=True)
        self.queue_dir.mkdir()
        data = self.root / "data"
        data.mkdir(mode=0o700)
        os.chown(data, pwd.getpwnam("postfix").pw_uid, pwd.getpwnam("postfix").pw_gid)
        self.vmail.mkdir(mode=0o700)
        os.chown(self.vmail, nobody.pw_uid, nobody.pw_gid)
        (self.conf_dir / "vmailbox").write_text(
            "".join(f"{user}@{self.domain} {self.domain}/{user}/\n" for user in self.mailboxes))
        tls = ""
        if self.tls:
            cert, key = self.conf_dir / "cert.pem", self.conf_dir / "key.pem"
            self_signed(self.hostname, cert, key)
            tls = f"""
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_loglevel = 1
smtp_tls_security_level = may
smtp_tls_loglevel = 1
"""
        (self.conf_dir / "main.cf").write_text(f"""\
# private test instance: postfix -c {self.conf_dir} start|stop
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {data}
syslog_name = postfix-test
maillog_file = {self.log_path}
maillog_file_prefixes = {self.root}
myhostname = {self.hostname}
mydomain = {self.domain}
myorigin = $mydomain
mydestination =
# an interface address (postfix check wants one); smtpd itself binds {self.host} in master.cf
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks reject_unauth_destination
alias_maps =
alias_database =
local_recipient_maps =
virtual_mailbox_domains = {self.domain}
virtual_mailbox_base = {self.vmail}
virtual_mailbox_maps = texthash:{self.conf_dir}/vmailbox
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
relayhost = {self.relayhost}
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
# one try per queue run, retried soon: a test waits seconds, not minutes
minimal_backoff_time = 1s
maximal_backoff_time = 2s
queue_run_delay = 1s
biff = no
append_dot_mydomain = no
smtpd_banner = $myhostname ESMTP $mail_name
{tls}""")
        (self.conf_dir / "master.cf").write_text(
            f"{self.host}:{self.port} inet n - n - - smtpd\n" + _MASTER_CF)
        # Postfix waits (up to seconds) for a file changed in the last second to settle before
        # it reads it (dict_load_file); these are complete, so date them back.
        past = time.time() - 60
        for path in self.conf_dir.iterdir():
            os.utime(path, (past, past))

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["postfix", "-c", str(self.conf_dir), *args],
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"postfix {' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr}\n{self.log()[-2000:]}")
        return result

    def start(self) -> None:
        self.postfix("start")
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.master_pid = int(pid_file.read_text().strip())
                with socket.create_connection((self.host, self.port), timeout=2) as sock:
                    if sock.recv(512).startswith(b"220 "):
                        sock.sendall(b"QUIT\r\n")
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"Postfix did not greet on {self.host}:{self.port}:\n{self.log()}")

    def stop(self) -> None:
        """``postfix stop``; the master is killed by PID if it is still there after 10 s."""
        self.postfix("stop", check=False)
        pid = self.master_pid
        if pid is None:  # start() may have failed before it read the pid file
            try:
                pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
            except (OSError, ValueError):
                return
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        self.master_pid = None

    def sendmail(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Inject with Postfix's own sendmail(1) (postdrop into this instance's maildrop)."""
        subprocess.run(["sendmail", "-C", str(self.conf_dir), "-f", sender, "-i", "--",
                        *recipients], input=message, check=True, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def maildir(self, address: str) -> Path:
        local, _, domain = address.partition("@")
        return self.vmail / domain / local

    def messages(self, address: str) -> list[bytes]:
        new = self.maildir(address) / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def wait_log(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """The first match of the regular expression *pattern* in the log, waiting for it."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, self.log())
            if match:
                found.append(match)
            return match is not None

        wait_until(seen, timeout, lambda: f"{pattern!r} not in Postfix's log:\n{self.log()}")
        return found[0]


def wait_until(predicate: Callable[[], object], timeout: float,
               why: Callable[[], str] = lambda: "condition not reached in time") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(why())


@contextmanager
def running_postfix(*, host: str = "127.0.0.3", port: int = 0, mailboxes: tuple[str, ...] = ("dave",),
                    relayhost: str = "", tls: bool = True) -> Iterator[PostfixInstance]:
    """A started instance in a fresh directory; stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="postroom-postfix-", dir="/tmp"))
    os.chmod(root, 0o755)
    instance = PostfixInstance(root, host=host, port=port or free_port_on(host),
                               mailboxes=list(mailboxes), relayhost=relayhost, tls=tls)
    try:
        instance.write_config()
        instance.start()
        yield instance
    finally:
        try:
            instance.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
