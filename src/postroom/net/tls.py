"""TLS for the SMTP listeners: the server context, and a self-signed certificate when none is set.

TLS 1.2 and 1.3 only, forward-secret AEAD ciphers (RFC 8996 retired older versions; RFC 7525
recommends the cipher choice). With no ``tls.cert_file`` the server makes a self-signed
certificate for its host name on first start, in ``data_dir/tls/``, and says so in the log:
opportunistic STARTTLS between MTAs works with it, and clients of the submission ports should
get a real certificate (see the README).
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postroom import log
from postroom.config import Config
from postroom.errors import ConfigError

#: TLS 1.2 suites with forward secrecy and AEAD; TLS 1.3 suites are all fine and set apart.
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def self_signed(hostname: str, cert_path: Path, key_path: Path) -> None:
    """Write a new P-256 key and a self-signed certificate for *hostname* (valid 10 years)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def certificate_files(config: Config) -> tuple[Path, Path]:
    """The configured certificate and key, or the self-signed pair (made when missing)."""
    tls = config.tls
    if tls.cert_file is not None and tls.key_file is not None:
        return tls.cert_file, tls.key_file
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("tls.cert_file and tls.key_file go together: set both or neither")
    directory = config.data_dir / "tls"
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not (cert.exists() and key.exists()):
        self_signed(config.hostname, cert, key)
        log.logger.warning(
            "no TLS certificate configured: made a self-signed one for %s in %s "
            "(set tls.cert_file and tls.key_file for a real one)", config.hostname, directory)
    return cert, key


def server_context(config: Config) -> ssl.SSLContext:
    """A server-side context loaded with the certificate; ConfigError names what failed."""
    cert, key = certificate_files(config)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load certificate {cert} / key {key}: {exc}") from None
    return context


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """``(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))`` for Received."""
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    if cipher is None:
        return None
    name, version, bits = cipher
    return f"(using {ssl_object.version() or version} with cipher {name} ({bits}/{bits} bits))"
