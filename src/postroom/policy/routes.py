"""What the router decides for one recipient: where it goes, or why it is refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class LocalDelivery:
    """Deliver into the Maildir of a local account."""

    mailbox: str  # the account's address, e.g. "alice@example.com"; goes into Delivered-To
    maildir: Path  # the Maildir root (holds tmp/, new/, cur/)
    quota: int = 0  # octets; 0 is unlimited


@dataclass(frozen=True, slots=True)
class RemoteDelivery:
    """Relay to another domain's MX (the relay issue delivers these)."""

    address: str


Destination = LocalDelivery | RemoteDelivery


@dataclass(frozen=True, slots=True)
class Rejected:
    """The recipient is refused; the reply to send at RCPT."""

    code: int
    enhanced: str
    text: str
