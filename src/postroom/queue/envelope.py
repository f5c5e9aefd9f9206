"""The envelope of one message: sender, recipients with their routes and delivery states.

One ``RCPT TO`` may expand (aliases) into several :class:`Recipient` entries that share the same
``original`` address. The envelope is serialised as one JSON object so a queue file can hold it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from postroom.policy.routes import Destination, LocalDelivery, RemoteDelivery

#: Attempts kept per recipient in its history.
HISTORY = 20


class RecipientState(StrEnum):
    PENDING = "pending"  # not yet tried
    DEFERRED = "deferred"  # tried, failed temporarily; ``next_attempt`` says when again
    DELIVERED = "delivered"
    BOUNCED = "bounced"  # failed permanently
    HELD = "held"  # an operator put it on hold

    @property
    def done(self) -> bool:
        return self in (RecipientState.DELIVERED, RecipientState.BOUNCED)


@dataclass(slots=True)
class Recipient:
    original: str  # the address as given in RCPT TO (orig_to in the log)
    destination: Destination
    orcpt: str | None = None  # RFC 3461 ORCPT, decoded "type;address"
    notify: frozenset[str] | None = None  # RFC 3461 NOTIFY keywords; None when not given
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    #: What the last attempt ended with, for the log, ``queue show`` and a DSN (RFC 3464 2.3):
    #: the enhanced status, the remote host and its reply, and the command it answered.
    status: str | None = None
    remote_mta: str | None = None
    diagnostic: str | None = None
    stage: str | None = None
    last_attempt: float = 0.0
    #: Notices sent about this recipient: "delay", "failure", "success" (never twice).
    notified: list[str] = field(default_factory=list)
    #: Delivered with NOTIFY=SUCCESS and a notice is ours to send: the RFC 3464 Action it
    #: reports ("delivered", "relayed"). Saved with the delivery, so a crash cannot lose it.
    success: str | None = None
    #: The last :data:`HISTORY` attempts: {"time", "result", "detail"}.
    history: list[dict[str, Any]] = field(default_factory=list)

    def record(self, when: float, result: str, detail: str) -> None:
        self.history.append({"time": round(when, 3), "result": result, "detail": detail})
        del self.history[:-HISTORY]

    @property
    def address(self) -> str:
        """The address delivery works on (after alias expansion)."""
        dest = self.destination
        return dest.mailbox if isinstance(dest, LocalDelivery) else dest.address

    def to_dict(self) -> dict[str, Any]:
        dest = self.destination
        if isinstance(dest, LocalDelivery):
            route: dict[str, Any] = {
                "local": dest.mailbox,
                "maildir": str(dest.maildir),
                "quota": dest.quota,
            }
        else:
            route = {"remote": dest.address}
        return {
            "original": self.original,
            "route": route,
            "orcpt": self.orcpt,
            "notify": sorted(self.notify) if self.notify is not None else None,
            "state": self.state.value,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": self.last_error,
            "status": self.status,
            "remote_mta": self.remote_mta,
            "diagnostic": self.diagnostic,
            "stage": self.stage,
            "last_attempt": self.last_attempt,
            "notified": self.notified,
            "success": self.success,
            "history": self.history,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipient:
        route = data["route"]
        destination: Destination
        if "local" in route:
            destination = LocalDelivery(route["local"], Path(route["maildir"]), route["quota"])
        else:
            destination = RemoteDelivery(route["remote"])
        notify = data.get("notify")
        return cls(
            original=data["original"],
            destination=destination,
            orcpt=data.get("orcpt"),
            notify=frozenset(notify) if notify is not None else None,
            state=RecipientState(data.get("state", "pending")),
            attempts=data.get("attempts", 0),
            next_attempt=data.get("next_attempt", 0.0),
            last_error=data.get("last_error"),
            status=data.get("status"),
            remote_mta=data.get("remote_mta"),
            diagnostic=data.get("diagnostic"),
            stage=data.get("stage"),
            last_attempt=data.get("last_attempt", 0.0),
            notified=list(data.get("notified", [])),
            success=data.get("success"),
            history=list(data.get("history", [])),
        )


@dataclass(slots=True)
class Envelope:
    queue_id: str
    sender: str  # "" for the null reverse path <>
    arrival: float  # time.time() when MAIL was accepted
    client_address: str = ""
    client_name: str = ""  # "unknown" when there is no reverse DNS
    helo: str = ""
    recipients: list[Recipient] = field(default_factory=list)
    size: int = 0  # octets of the message as received (CRLF), without our headers
    body_type: str | None = None  # "7BIT" / "8BITMIME" from MAIL BODY=
    smtputf8: bool = False
    ret: str | None = None  # RFC 3461 RET=FULL|HDRS
    envid: str | None = None  # RFC 3461 ENVID, decoded
    hold: bool = False
    queued: float = 0.0  # time.time() when the message was accepted (end of data)
    #: Raised by every saved change: the newest of the queue file and the attempt journal's
    #: records (:mod:`postroom.queue.journal`) is the truth.
    rev: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "queue_id": self.queue_id,
                "sender": self.sender,
                "arrival": self.arrival,
                "client_address": self.client_address,
                "client_name": self.client_name,
                "helo": self.helo,
                "recipients": [r.to_dict() for r in self.recipients],
                "size": self.size,
                "body_type": self.body_type,
                "smtputf8": self.smtputf8,
                "ret": self.ret,
                "envid": self.envid,
                "hold": self.hold,
                "queued": self.queued,
                "rev": self.rev,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        data = json.loads(text)
        return cls(
            queue_id=data["queue_id"],
            sender=data["sender"],
            arrival=data["arrival"],
            client_address=data.get("client_address", ""),
            client_name=data.get("client_name", ""),
            helo=data.get("helo", ""),
            recipients=[Recipient.from_dict(r) for r in data.get("recipients", [])],
            size=data.get("size", 0),
            body_type=data.get("body_type"),
            smtputf8=data.get("smtputf8", False),
            ret=data.get("ret"),
            envid=data.get("envid"),
            hold=data.get("hold", False),
            queued=data.get("queued", 0.0),
            rev=data.get("rev", 0),
        )

    @property
    def done(self) -> bool:
        return all(r.state.done for r in self.recipients)
