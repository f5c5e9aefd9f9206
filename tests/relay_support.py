"""What the relay tests share: the configuration of a postroom that relays for 127.0.0.0/8 by
MX lookups at a test DNS server (tests/dns_support.py) to MX hosts on one port, and parsing."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage


def relay_config(dns_port: int, mx_port: int, *, lifetime: float = 600.0,
                 min_backoff: float = 1.0, max_backoff: float = 2.0,
                 outbound: str = "dead_destination_time = 0", queue: str = "") -> str:
    """``[relay]``, ``[outbound]`` and ``[queue]`` for a sending postroom in a test: it trusts
    127.0.0.0/8, asks only the DNS server on 127.0.0.1:*dns_port*, may connect to loopback
    MX hosts (on *mx_port*), and retries within seconds. *outbound* and *queue* add keys."""
    return f"""
[relay]
trusted_networks = ["127.0.0.0/8"]

[outbound]
nameservers = ["127.0.0.1"]
dns_port = {dns_port}
dns_timeout = 2.0
allow_networks = ["127.0.0.0/8"]
smtp_port = {mx_port}
connect_timeout = 3.0
{outbound}

[queue]
min_backoff = {min_backoff}
max_backoff = {max_backoff}
max_lifetime = {lifetime}
scan_interval = 0.5
{queue}
"""


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message
