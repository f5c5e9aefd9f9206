"""Typed configuration, read from one TOML file.

Every key has a safe default, so ``postroom serve`` runs with no file at all. An unknown or invalid key
is a :class:`~postroom.errors.ConfigError` that names the key and the file. The defaults follow
Postfix's where a Postfix administrator would look for the same knob (``message_size_limit``,
``smtpd_recipient_limit``, ``hopcount_limit``, ``mynetworks``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from postroom.errors import ConfigError

#: Where the server keeps its data when no ``data_dir`` is configured.
DEFAULT_DATA_DIR_ROOT = Path("/var/lib/postroom")
DEFAULT_DATA_DIR_USER = Path("postroom-data")

Role = Literal["mx", "submission", "submissions", "pop3", "pop3s"]

#: The listeners made when none is configured: the standard ports when we may bind them, else
#: the same numbers above 2000 (RFC 5321 25, RFC 6409 587, RFC 8314 465, RFC 1939 110, 995).
DEFAULT_PORTS_ROOT: dict[Role, int] = {"mx": 25, "submission": 587, "submissions": 465,
                                       "pop3": 110, "pop3s": 995}
DEFAULT_PORTS_USER: dict[Role, int] = {"mx": 2525, "submission": 2587, "submissions": 2465,
                                       "pop3": 2110, "pop3s": 2995}
SMTP_ROLES = frozenset({"mx", "submission", "submissions"})


def running_as_root() -> bool:
    return os.geteuid() == 0


def default_hostname() -> str:
    """The machine's own name, without a DNS query (``socket.getfqdn`` would make one)."""
    name = socket.gethostname() or "localhost"
    return name.lower().rstrip(".")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSection(_Section):
    #: Name used in the banner, the EHLO reply, Received headers and Message-IDs.
    hostname: str = ""
    #: One directory holds everything: accounts database, queue, mailboxes.
    data_dir: Path | None = None
    #: When started as root: bind the ports, then run as this user. "" keeps root (not advised).
    run_as: str = "postroom"
    #: SMTP worker processes sharing the listening sockets (one event loop each). More than one
    #: uses more cores; the queue runner lives in worker 0 (unless ``queue_process``).
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    #: Run the queue manager (relay, retries, notices, the control socket) in a process of its
    #: own beside the workers, as Postfix's qmgr: a relay that is busy receiving and sending at
    #: once uses a second core (2x Postfix's rate on the relay benchmark, against about 1x in one
    #: process), and a crash of either side leaves the other running. The workers hand it each
    #: queued message's id. false: one process does everything (least memory).
    queue_process: bool = True
    log_file: Path | None = None
    log_json: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def resolved_hostname(self) -> str:
        return self.hostname or default_hostname()

    def resolved_data_dir(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir
        return DEFAULT_DATA_DIR_ROOT if running_as_root() else DEFAULT_DATA_DIR_USER


class ListenerSection(_Section):
    """One SMTP port. The role sets what a mail administrator expects of that port:

    - ``mx`` (25): mail from other servers; STARTTLS offered; AUTH off unless ``auth = true``.
    - ``submission`` (587, RFC 6409): mail clients; STARTTLS, then AUTH; MAIL needs AUTH.
    - ``submissions`` (465, RFC 8314): the same, in TLS from the first byte.
    - ``pop3`` (110, RFC 1939): mailbox access; STLS, login only inside TLS by default.
    - ``pop3s`` (995, RFC 8314): the same, in TLS from the first byte.
    """

    role: Role = "mx"
    #: "host:port"; an IPv6 host goes in brackets: "[::1]:25".
    address: str
    #: Offer SMTP AUTH here. Default: off on mx, on for the submission roles.
    auth: bool | None = None

    @model_validator(mode="after")
    def _check_auth(self) -> ListenerSection:
        if self.auth is False and self.role != "mx":
            raise ValueError(f"a {self.role} listener needs auth (its clients must log in)")
        return self

    @property
    def smtp(self) -> bool:
        return self.role in SMTP_ROLES

    @property
    def implicit_tls(self) -> bool:
        return self.role in ("submissions", "pop3s")

    @property
    def offers_auth(self) -> bool:
        return self.auth if self.auth is not None else self.role != "mx"

    @property
    def requires_auth(self) -> bool:
        """RFC 6409 4.1: a submission server authenticates its clients before MAIL."""
        return self.role != "mx"

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_hostport(value)
        return value

    def host_port(self) -> tuple[str, int]:
        return parse_hostport(self.address)


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


class SmtpSection(_Section):
    banner: str = "ESMTP postroom"
    #: Largest message in octets (Postfix message_size_limit: 10240000).
    max_message_size: Annotated[int, Field(ge=1024)] = 10_240_000
    #: Recipients per message (Postfix smtpd_recipient_limit: 1000); more get 452 4.5.3.
    max_recipients: Annotated[int, Field(ge=1)] = 1000
    #: Longest text line accepted in DATA, in octets with the CRLF. RFC 5321 says 1000, but real
    #: mail has longer lines; past this bound the message is drained and refused with 500 5.5.2.
    max_line_length: Annotated[int, Field(ge=1000)] = 65_536
    #: More Received headers than this is a loop: 554 5.4.6 (Postfix hopcount_limit is 50).
    max_received_headers: Annotated[int, Field(ge=1)] = 100
    #: Refuse DATA with a bare LF line ending (554 5.6.0). Default: take it as a line end, as
    #: Postfix 3.9's smtpd_forbid_bare_newline = normalize does.
    reject_bare_lf: bool = False
    #: Answer VRFY truthfully (250/550) instead of 252.
    vrfy: bool = False
    #: Errors in a session before it is dropped with 421 (Postfix smtpd_hard_error_limit).
    max_errors: Annotated[int, Field(ge=1)] = 20
    max_connections: Annotated[int, Field(ge=1)] = 1000
    #: Postfix smtpd_client_connection_count_limit.
    max_connections_per_ip: Annotated[int, Field(ge=1)] = 50
    #: RFC 5321 4.5.3.2 server timeout while waiting for a command (5 minutes).
    command_timeout: Annotated[float, Field(gt=0)] = 300.0
    #: RFC 5321 4.5.3.2 data block timeout (3 minutes), between two reads of message data.
    data_timeout: Annotated[float, Field(gt=0)] = 180.0
    #: Seconds in-flight transactions get to finish after SIGTERM.
    shutdown_grace: Annotated[float, Field(ge=0)] = 30.0


class RelaySection(_Section):
    #: Networks that may relay without authentication (Postfix mynetworks). Empty: nobody,
    #: not even loopback.
    trusted_networks: list[str] = Field(default_factory=list)

    @field_validator("trusted_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.trusted_networks]


TlsPolicyName = Literal["none", "opportunistic", "required"]


class OutboundSection(_Section):
    """Mail to other domains: DNS, next hops, TLS, connections (Postfix's smtp client)."""

    #: Name servers for MX/A/AAAA lookups; empty: the system's (/etc/resolv.conf).
    nameservers: list[str] = Field(default_factory=list)
    dns_port: Annotated[int, Field(ge=1, le=65535)] = 53
    dns_timeout: Annotated[float, Field(gt=0)] = 10.0
    #: Send everything through this host instead of MX lookups (Postfix relayhost):
    #: "[smtp.example.net]:587" (no MX lookup) or "example.net" (its MX). "" for none.
    relayhost: str = ""
    relayhost_username: str = ""
    relayhost_password: str = Field(default="", repr=False)
    #: TLS with the relay host; default: the general ``tls_policy``.
    relayhost_tls: TlsPolicyName | None = None
    #: Per-domain next hops (Postfix transport_maps): {"example.org" = "[10.0.0.5]:25"};
    #: a key ".example.org" covers its subdomains.
    transports: dict[str, str] = Field(default_factory=dict)
    #: STARTTLS with MX hosts: none, opportunistic (RFC 3207 as Postfix's "may"), or required
    #: (verified certificate; no delivery otherwise).
    tls_policy: TlsPolicyName = "opportunistic"
    #: Destinations the DNS names that are loopback/private are refused unless listed here.
    allow_networks: list[str] = Field(default_factory=list)
    #: The port MX hosts listen on (25; tests change it).
    smtp_port: Annotated[int, Field(ge=1, le=65535)] = 25
    connect_timeout: Annotated[float, Field(gt=0)] = 30.0
    #: Convert 8-bit mail to quoted-printable for a server without 8BITMIME (RFC 6152 3; one
    #: that cannot be converted bounces 5.6.3). false sends it as it is, as Postfix's
    #: disable_mime_output_conversion does (kept for DKIM signatures; RFC 6152 says convert).
    mime_conversion: bool = True
    #: Deliveries at once to one destination (Postfix default_destination_concurrency_limit).
    max_per_destination: Annotated[int, Field(ge=1)] = 20
    #: Recipients per SMTP transaction (Postfix default_destination_recipient_limit is 50).
    max_recipients_per_transaction: Annotated[int, Field(ge=1)] = 50
    #: Seconds a destination that could not be reached at all is skipped by other messages.
    dead_destination_time: Annotated[float, Field(ge=0)] = 60.0

    @field_validator("allow_networks")
    @classmethod
    def _check_allowed(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value


class DeliverySection(_Section):
    #: ``user+tag@domain`` delivers to ``user@domain``; "" turns subaddressing off.
    recipient_delimiter: str = "+"
    #: How deep aliases may point at aliases before the expansion is refused as a loop.
    alias_max_depth: Annotated[int, Field(ge=1)] = 20
    #: Default mailbox quota in octets for new users; 0 means unlimited.
    default_quota: Annotated[int, Field(ge=0)] = 0
    #: Where mail for <Postmaster> goes when no account or alias named postmaster exists in
    #: the primary domain. "" means the built-in postmaster Maildir in the data directory.
    postmaster: str = ""


class QueueSection(_Section):
    #: First retry after a temporary failure, then doubling up to max (Postfix
    #: minimal_backoff_time / maximal_backoff_time / maximal_queue_lifetime).
    min_backoff: Annotated[float, Field(gt=0)] = 300.0
    max_backoff: Annotated[float, Field(gt=0)] = 4000.0
    max_lifetime: Annotated[float, Field(gt=0)] = 5 * 86400.0
    #: How often the queue runner looks for due messages.
    scan_interval: Annotated[float, Field(gt=0)] = 60.0
    #: A "still trying" notice (RFC 3464 delayed) after this many seconds; 0: never (Postfix's
    #: delay_warning_time default).
    delay_warning: Annotated[float, Field(ge=0)] = 0.0
    #: Bounces return the whole message up to this size, else its headers (Postfix
    #: bounce_size_limit).
    bounce_size_limit: Annotated[int, Field(ge=1)] = 50_000
    #: A bounce that cannot be delivered goes to the postmaster (true) or is dropped.
    double_bounce_to_postmaster: bool = True


class TlsSection(_Section):
    """Certificate for STARTTLS. Both unset: a self-signed one is made in ``data_dir/tls``."""

    cert_file: Path | None = None  # PEM, the certificate followed by its chain
    key_file: Path | None = None  # PEM private key; read before privileges are dropped
    #: Offer STARTTLS on ``mx`` listeners (RFC 3207).
    starttls: bool = True


Mechanism = Literal["SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5"]


def _default_mechanisms() -> list[Mechanism]:
    return ["SCRAM-SHA-256", "PLAIN", "LOGIN"]


class AuthSection(_Section):
    """SMTP AUTH (and later POP3/IMAP logins): mechanisms and brute-force protection."""

    #: SASL mechanisms offered, in this order. CRAM-MD5 works only for accounts that opted in
    #: (it needs a plaintext-equivalent secret); add it here to offer it.
    mechanisms: list[Mechanism] = Field(default_factory=_default_mechanisms, min_length=1)
    #: Allow AUTH without TLS from loopback clients (a local webmail, say). Never elsewhere.
    allow_plaintext_on_loopback: bool = False
    #: PBKDF2 iterations for SCRAM keys made when a password is set (RFC 7677: at least 4096).
    scram_iterations: Annotated[int, Field(ge=4096, le=10_000_000)] = 4096
    #: Password checks (argon2, 64 MiB each at the default cost) running at once, per process.
    max_parallel_checks: Annotated[int, Field(ge=1, le=64)] = 4
    #: Brute-force protection (``postroom.policy.authlimit`` explains the numbers). Failures
    #: from one client address answered without delay; later ones wait 1, 2, 4 ... seconds.
    ip_free_failures: Annotated[int, Field(ge=0)] = 3
    #: Failures from one address (decaying, see ``ip_half_life``) at which it is refused
    #: (421 4.7.0) for ``block_seconds``.
    ip_max_failures: Annotated[int, Field(ge=1)] = 10
    #: Seconds in which an address's failure count halves.
    ip_half_life: Annotated[float, Field(gt=0)] = 600.0
    block_seconds: Annotated[float, Field(gt=0)] = 600.0
    #: Failures for one account (from any address) answered without delay. An account is
    #: never locked: its failures only delay further failure replies; the right password
    #: works at once.
    account_free_failures: Annotated[int, Field(ge=0)] = 5
    account_half_life: Annotated[float, Field(gt=0)] = 1800.0
    #: The longest wait before a failure reply, in seconds.
    max_delay: Annotated[float, Field(ge=0, le=300)] = 15.0
    @model_validator(mode="after")
    def _check_limits(self) -> AuthSection:
        if self.ip_max_failures <= self.ip_free_failures:
            raise ValueError("ip_max_failures must be greater than ip_free_failures")
        return self

    #: Record the authenticated user in the Received header (off: RFC 6409 leaves it to us,
    #: and it tells every recipient a login name).
    received_header_user: bool = False
    #: An authenticated user may only use sender addresses that are theirs (553 5.7.1).
    enforce_sender: bool = True


class Pop3Section(_Section):
    """POP3 (RFC 1939) on the ``pop3`` and ``pop3s`` listeners."""

    #: USER/PASS and AUTH PLAIN/LOGIN before STLS (RFC 2595 2.3 says no; for a closed network).
    allow_plaintext: bool = False
    #: APOP (RFC 1939 7): needs the account's CRAM-MD5 secret; off by default.
    apop: bool = False
    #: RFC 1939 3: the autologout timer is at least 10 minutes.
    idle_timeout: Annotated[float, Field(ge=600)] = 600.0
    max_connections: Annotated[int, Field(ge=1)] = 1000
    max_connections_per_ip: Annotated[int, Field(ge=1)] = 20
    #: RFC 2449 6.7 EXPIRE, advertised in CAPA and enforced: days a message stays on the server
    #: after POP3 first retrieved it (RETR), then it is removed at a later login; 0 removes what
    #: a session retrieved at its QUIT; "NEVER" keeps everything. Unset: not advertised.
    expire: Annotated[int, Field(ge=0, le=100_000)] | Literal["NEVER"] | None = None
    #: RFC 2449 6.5 LOGIN-DELAY, advertised and enforced: seconds from one login to a mailbox to
    #: the next; one sooner gets ``-ERR [LOGIN-DELAY]``. Unset: no limit.
    login_delay: Annotated[int, Field(ge=1, le=86_400)] | None = None

    @field_validator("expire", mode="before")
    @classmethod
    def _never(cls, value: object) -> object:
        """"never" in any case, as an administrator may write it; not true/false."""
        if isinstance(value, bool):
            raise ValueError('a number of days or "NEVER"')
        if isinstance(value, str) and value.strip().upper() == "NEVER":
            return "NEVER"
        return value


class PasswordSection(_Section):
    """argon2id cost. The defaults are RFC 9106's second recommended option."""

    time_cost: Annotated[int, Field(ge=1)] = 3
    memory_cost_kib: Annotated[int, Field(ge=8)] = 65536
    parallelism: Annotated[int, Field(ge=1)] = 4


class Config(_Section):
    server: ServerSection = Field(default_factory=ServerSection)
    listener: list[ListenerSection] = Field(default_factory=list)
    smtp: SmtpSection = Field(default_factory=SmtpSection)
    relay: RelaySection = Field(default_factory=RelaySection)
    outbound: OutboundSection = Field(default_factory=OutboundSection)
    delivery: DeliverySection = Field(default_factory=DeliverySection)
    queue: QueueSection = Field(default_factory=QueueSection)
    tls: TlsSection = Field(default_factory=TlsSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    pop3: Pop3Section = Field(default_factory=Pop3Section)
    passwords: PasswordSection = Field(default_factory=PasswordSection)
    #: The file this came from, for messages; None for embedded defaults.
    source: Path | None = None

    def listeners(self) -> list[ListenerSection]:
        if self.listener:
            return list(self.listener)
        ports = DEFAULT_PORTS_ROOT if running_as_root() else DEFAULT_PORTS_USER
        return [ListenerSection(role=role, address=f"0.0.0.0:{port}")
                for role, port in ports.items()]

    @property
    def data_dir(self) -> Path:
        return self.server.resolved_data_dir()

    @property
    def hostname(self) -> str:
        return self.server.resolved_hostname()


def _key_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts)


def from_dict(data: dict[str, Any], source: Path | None = None) -> Config:
    where = str(source) if source else "<embedded>"
    try:
        config = Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = _key_path(err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"{where}: unknown key '{key}'")
            else:
                problems.append(f"{where}: invalid value for '{key}': {err['msg']}")
        raise ConfigError("\n".join(problems)) from None
    # Settle what depends on who runs us now, so a server that drops root later still uses the
    # root defaults (data directory, ports), and a relative data_dir stays where it was meant.
    server = config.server.model_copy(
        update={"data_dir": config.server.resolved_data_dir().absolute(),
                "hostname": config.server.resolved_hostname()}
    )
    return config.model_copy(update={"server": server, "listener": config.listeners()})


def load(path: Path | None) -> Config:
    """Read *path*, or return the embedded defaults when it is None."""
    if path is None:
        return from_dict({})
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if "source" in data:
        raise ConfigError(f"{path}: unknown key 'source'")
    return from_dict(data, path)
