"""swaks (a real SMTP client) authenticates against the SASL core: PLAIN, LOGIN, CRAM-MD5.

swaks's ``--pipe`` transport runs a program and talks SMTP over its stdin and stdout, so no socket
is needed: the program below is the smallest SMTP server that carries an AUTH exchange the way
RFC 4954 says (334 challenges in base64, 235 2.7.0, 535 5.7.8, 501 for syntax and "*"), driven
by :class:`postroom.sasl.Exchange`. This checks the framing and the mechanisms against a client
we did not write; it is not the SMTP AUTH wiring itself.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed"),
]

SERVER = r"""
import sys

from postroom.accounts.passwords import hash_password
from postroom.config import PasswordSection
from postroom.sasl import (
    Challenge, Failure, FailureKind, PasswordCheck, SaslSettings, Success, derive_scram_keys,
    open_exchange,
)

class Store:
    hashes = {"alice@example.org": hash_password(
        "correct horse", PasswordSection(time_cost=1, memory_cost_kib=8, parallelism=1))}
    secrets = {"tim": "tanstaaftanstaaf"}
    def password_hash(self, authcid): return self.hashes.get(authcid)
    def scram_keys(self, authcid, mechanism): return None
    def cram_secret(self, authcid): return self.secrets.get(authcid)

OFFERED = ("SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5")
REPLIES = {
    FailureKind.REJECTED: "535 5.7.8 Authentication credentials invalid",
    FailureKind.MALFORMED: "501 5.5.2 Cannot decode response",
    FailureKind.CANCELLED: "501 5.7.0 Authentication cancelled",
    FailureKind.TOO_LONG: "500 5.5.6 Authentication exchange line is too long",
    FailureKind.INITIAL_RESPONSE_REFUSED: "501 5.7.0 No initial response allowed",
    FailureKind.UNAVAILABLE: "454 4.7.0 Temporary authentication failure",
}
settings = SaslSettings(
    credentials=Store(), hostname="mail.example", nonce=lambda: "4711", clock=lambda: 1700000000,
    decoy_secret=b"0123456789abcdef",
)
out = sys.stdout.buffer

def send(line):
    out.write(line.encode() + b"\r\n")
    out.flush()

def read():
    return sys.stdin.buffer.readline().rstrip(b"\r\n")

send("220 mail.example ESMTP sasl test")
while line := read():
    verb, _, arg = line.decode().partition(" ")
    verb = verb.upper()
    if verb == "EHLO":
        send("250-mail.example")
        send("250 AUTH " + " ".join(OFFERED))
    elif verb == "AUTH":
        name, _, initial = arg.partition(" ")
        exchange = open_exchange(name, settings, offered=OFFERED)
        if exchange is None:
            send("504 5.5.4 Unrecognized authentication type")
            continue
        outcome = exchange.begin(initial or None)
        while True:
            if isinstance(outcome, Challenge):
                send(("334 " + outcome.text).rstrip(" ") if outcome.text else "334 ")
                outcome = exchange.receive(read())
            elif isinstance(outcome, PasswordCheck):
                outcome = exchange.password_checked(outcome.check())
            elif isinstance(outcome, Success):
                send("235 2.7.0 Authentication successful")
                break
            else:
                send(REPLIES[outcome.kind])
                break
    elif verb == "QUIT":
        send("221 2.0.0 Bye")
        break
    else:
        send("502 5.5.1 Not in this test")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("swaks") / "sasl_server.py"
    path.write_text(SERVER)
    return path


def swaks(server: Path, *args: str) -> list[str]:
    """The server's lines as swaks printed them (it marks them "<-", and errors "<**")."""
    done = subprocess.run(
        [
            "swaks",
            "--pipe",
            f"{sys.executable} {server}",
            "--helo",
            "client.example",
            "--from",
            "alice@example.org",
            "--to",
            "bob@example.org",
            "--quit-after",
            "AUTH",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return [
        line[3:].strip()
        for line in (done.stdout + done.stderr).splitlines()
        if line.startswith(("<-", "<**"))
    ]


GREETING = [
    "220 mail.example ESMTP sasl test",
    "250-mail.example",
    "250 AUTH SCRAM-SHA-256 PLAIN LOGIN CRAM-MD5",
]
OK = "235 2.7.0 Authentication successful"
BAD = "535 5.7.8 Authentication credentials invalid"
BYE = "221 2.0.0 Bye"


def test_swaks_plain(server: Path) -> None:
    """swaks sends PLAIN's initial response with the command: no 334 at all."""
    user = ("--auth", "PLAIN", "--auth-user", "alice@example.org", "--auth-password")
    assert swaks(server, *user, "correct horse") == [*GREETING, OK, BYE]
    assert swaks(server, *user, "wrong") == [*GREETING, BAD, BYE]


def test_swaks_login(server: Path) -> None:
    user = ("--auth", "LOGIN", "--auth-user", "alice@example.org", "--auth-password")
    username, password = "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"  # "Username:", "Password:"
    assert swaks(server, *user, "correct horse") == [*GREETING, username, password, OK, BYE]
    assert swaks(server, *user, "wrong") == [*GREETING, username, password, BAD, BYE]


def test_swaks_cram_md5(server: Path) -> None:
    user = ("--auth", "CRAM-MD5", "--auth-user", "tim", "--auth-password")
    challenge = "334 PDQ3MTEuMTcwMDAwMDAwMEBtYWlsLmV4YW1wbGU+"  # <4711.1700000000@mail.example>
    assert swaks(server, *user, "tanstaaftanstaaf") == [*GREETING, challenge, OK, BYE]
    assert swaks(server, *user, "tanstaafTANSTAAF") == [*GREETING, challenge, BAD, BYE]
