"""Dovecot reads postroom's Maildir as it is: subjects, bodies and sizes (W=) agree."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ServerHandle

pytestmark = pytest.mark.skipif(
    shutil.which("dovecot") is None or shutil.which("doveadm") is None or os.geteuid() != 0,
    reason="needs Debian's dovecot-core and root (Dovecot will not serve uid 0's mail)",
)


def test_dovecot_reads_our_maildir(server: ServerHandle) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="c.test", timeout=10) as client:
        client.sendmail("a@remote.example", ["alice@example.com"],
                        b"Subject: first\r\n\r\n.dotted line\r\nplain line\r\n")
        client.sendmail("a@remote.example", ["alice@example.com"],
                        "Subject: second\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                        "caf\u00e9\r\n".encode(), mail_options=["BODY=8BITMIME"])
    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="postroom-dovecot-", dir="/tmp"))
    os.chmod(root, 0o755)
    maildir = root / "Maildir"
    shutil.copytree(server.maildir("alice@example.com"), maildir)  # byte-identical copies
    for path in [maildir, *maildir.rglob("*")]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    conf = root / "dovecot.conf"
    conf.write_text(f"""
protocols =
listen = 127.0.0.1
ssl = no
base_dir = {root}/run
log_path = {root}/dovecot.log
mail_location = maildir:{maildir}
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid={nobody.pw_uid} gid={nobody.pw_gid} home={root}
}}
""")
    proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (root / "run" / "auth-userdb").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        result = subprocess.run(
            ["doveadm", "-c", str(conf), "fetch", "-u", "alice",
             "hdr.subject size.virtual body", "all"],
            capture_output=True, text=True, timeout=30,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "hdr.subject: first" in out and "hdr.subject: second" in out
    assert ".dotted line\nplain line" in out
    assert "caf\u00e9" in out
    sizes = sorted(int(s) for s in re.findall(r"size.virtual: (\d+)", out))
    names = sorted(int(m) for m in re.findall(r",W=(\d+)",
                   " ".join(p.name for p in (server.maildir("alice@example.com") / "new").iterdir())))
    assert sizes == names  # Dovecot's CRLF size is the W= we put in the name
