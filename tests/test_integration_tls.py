"""STARTTLS over real sockets: smtplib, a raw injection attempt, openssl s_client, swaks."""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ServerHandle, make_server


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test server's certificate is self-signed
    return context


def test_smtplib_starttls_then_mail(server: ServerHandle) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="c.test", timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        code, text = client.starttls(context=client_context())
        assert (code, text) == (220, b"2.0.0 Ready to start TLS")
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.sock is not None and client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.sendmail("a@remote.example", ["alice@example.com"], b"Subject: tls\r\n\r\nsecret\r\n")
    [raw] = server.messages("alice@example.com")
    received = raw.split(b"\n\n")[0].decode()
    assert "with ESMTPS id" in received
    assert "(using TLSv1." in received and "with cipher" in received
    assert (server.data_dir / "tls" / "cert.pem").exists()
    assert "made a self-signed one for mx.test.example" in server.log()


def test_plaintext_pipelined_after_starttls_is_discarded(server: ServerHandle) -> None:
    """CVE-2011-0411: commands sent with STARTTLS in one segment never run inside TLS."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        assert sock.recv(1024).startswith(b"220 ")
        sock.sendall(b"EHLO c.test\r\n")
        buf = b""
        while not buf.endswith(b"250 STARTTLS\r\n"):
            buf += sock.recv(4096)
        sock.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@remote.example>\r\n")
        assert sock.recv(1024) == b"220 2.0.0 Ready to start TLS\r\n"
        tls = client_context().wrap_socket(sock, server_hostname="mx.test.example")
        tls.settimeout(1.0)
        with pytest.raises(TimeoutError):
            tls.recv(1024)  # no reply to RSET or MAIL ever comes
        tls.settimeout(10)
        tls.sendall(b"MAIL FROM:<a@remote.example>\r\n")
        assert tls.recv(1024) == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
        tls.sendall(b"EHLO c.test\r\n")
        greeting = b""
        while not greeting.endswith(b"250 DSN\r\n"):
            greeting += tls.recv(4096)
        assert b"STARTTLS" not in greeting
        tls.sendall(b"STARTTLS\r\n")
        assert tls.recv(1024) == b"503 5.5.1 Error: TLS already active\r\n"
        tls.close()
    finally:
        sock.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_starttls(server: ServerHandle) -> None:
    result = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-name", "c.test", "-connect",
         f"127.0.0.1:{server.port}", "-brief", "-ign_eof"],
        input="EHLO c.test\r\nQUIT\r\n", capture_output=True, text=True, timeout=30,
    )
    output = result.stdout + result.stderr
    assert "Protocol version: TLSv1.3" in output or "Protocol version: TLSv1.2" in output, output
    assert "250 DSN" in output and "221 2.0.0 Bye" in output


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_old_tls_versions_are_refused(server: ServerHandle) -> None:
    context = client_context()
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="c.test", timeout=10) as client:
        client.ehlo()
        with pytest.raises((ssl.SSLError, OSError)):
            client.starttls(context=context)


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_tls(server: ServerHandle) -> None:
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--helo", "swaks.test", "--tls",
         "--from", "sender@remote.example", "--to", "bob@example.com"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS started" in result.stdout
    [raw] = server.messages("bob@example.com")
    assert b"with ESMTPS id" in raw


def test_configured_certificate_and_starttls_off(tmp_path: Path) -> None:
    from postroom.net.tls import self_signed

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    self_signed("mail.example.com", cert, key)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    handle = make_server(tmp_path / "a", f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    handle.start()
    try:
        with smtplib.SMTP("127.0.0.1", handle.port, local_hostname="c.test", timeout=10) as c:
            c.ehlo()
            c.starttls(context=client_context())
            assert c.sock is not None
            der = c.sock.getpeercert(binary_form=True)
            assert der is not None and der == ssl.PEM_cert_to_DER_cert(cert.read_text())
    finally:
        handle.stop()
    off = make_server(tmp_path / "b", "[tls]\nstarttls = false\n")
    off.start()
    try:
        with smtplib.SMTP("127.0.0.1", off.port, local_hostname="c.test", timeout=10) as c:
            c.ehlo()
            assert not c.has_extn("starttls")
            assert c.docmd("STARTTLS")[0] == 502
    finally:
        off.stop()
