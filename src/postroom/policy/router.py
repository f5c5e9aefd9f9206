"""Where one recipient goes: local Maildirs, remote relay, or a refusal to send at RCPT.

For an address in a local domain the lookups run in this order, the first hit winning (Postfix's
virtual mailbox and alias maps, which fold case):

1. the exact user; 2. the exact alias, expanded recursively; 3. with subaddressing
(``user+tag``, RFC 5233), the base user, then the base alias; 4. the catch-all alias ``@domain``;
5. ``postmaster@`` any local domain: the postmaster route (RFC 5321 4.5.1 requires it to work);
6. otherwise ``550 5.1.1 User unknown``.

Alias expansion follows aliases to aliases. A cycle is caught as soon as an alias comes round a
second time, and nesting deeper than ``delivery.alias_max_depth`` is treated the same way:
``554 5.4.6`` (RFC 3463: routing loop detected). Destinations are deduplicated. A member of an alias
that cannot take mail (unknown, or its mailbox full) is skipped with a warning in the log while the
other members still get the message; if no member is left, the recipient is refused with that
member's reason.

The bare ``<Postmaster>`` (RFC 5321 4.5.1, no domain) goes to ``delivery.postmaster`` if set,
else to ``postmaster@<primary domain>`` if that resolves, else to a built-in Maildir in the data
directory, so mail to the postmaster is never refused.

A domain that is not local is relayed only when the client may relay (``554 5.7.1`` otherwise).
Old routing tricks never open the relay: a local part holding ``%`` (the percent hack), ``!``
(a bang path) or ``@`` (quoted) is only a literal local part of a local domain, which no account can
have (the store refuses such names): it is unknown, or it reaches the catch-all, which the
administrator pointed somewhere. An address literal (``user@[192.0.2.1]``) is never a local domain.
"""

from __future__ import annotations

import enum
import errno
import logging
import string
from collections.abc import Callable
from pathlib import Path

from postroom import log
from postroom.accounts.store import AccountStore, User, address_key, normalize_domain
from postroom.config import DeliverySection
from postroom.errors import StorageError
from postroom.message.address import Address
from postroom.policy.routes import Destination, LocalDelivery, Rejected, RemoteDelivery

#: The key of the postmaster route in an expansion path: entered once, then the built-in Maildir.
_POSTMASTER = "<postmaster>"

# RFC 5322 3.2.3 atext: a local part made of these (and single dots) needs no quotes.
_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")


class _Fail(enum.Enum):
    UNKNOWN = "unknown"
    FULL = "full"
    LOOP = "loop"


_Result = list[Destination] | _Fail


def format_address(local: str, domain: str) -> str:
    """``local@domain``, with the local part quoted (RFC 5321 4.1.2) when it is not a dot-atom."""
    pieces = local.split(".")
    dot_atom = all(pieces) and all(
        ch in _ATEXT or not ch.isascii() for ch in local.replace(".", "")
    )
    if not dot_atom:
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{domain}" if domain else local


class Router:
    """Resolve recipients against the accounts store (see the module docstring)."""

    def __init__(
        self,
        store: AccountStore,
        delivery: DeliverySection,
        usage: Callable[[Path, int, int], int],
        data_dir: Path,
    ) -> None:
        """*usage* ``(maildir, quota, incoming)`` returns the octets a Maildir holds now, for
        judging *incoming* more octets against *quota* (``MaildirUsage.cached``: it reads the
        Maildir++ ``maildirsize``, or raises ``UsageUnknown`` when that must be counted first).
        ``delivery`` may be replaced on a running router (configuration reload)."""
        self._store = store
        self.delivery = delivery
        self._usage = usage
        self._data_dir = data_dir
        self._full_ok = False  # set for the length of one resolve() (synchronous)

    # --- public ---

    def may_send_as(self, login: str, sender: str) -> bool:
        """May the authenticated *login* use *sender* (envelope or ``From:``)? Its own
        address, with a subaddress, the aliases that lead to it and the extra senders the
        operator granted (``postroom user sender``). StorageError when the store fails."""
        return self._store.may_send_as(login, sender, self.delivery.recipient_delimiter)

    def resolve(self, address: Address, *, may_relay: bool,
                full_mailbox_ok: bool = False) -> list[Destination] | Rejected:
        """The destinations of one ``RCPT TO`` address, or the reply refusing it.

        ``full_mailbox_ok``: a mailbox over its quota is routed all the same (for our own
        delivery notices, which nobody would retry after a 552: the spool queues the copy for
        a full mailbox until it has room or expires, as Postfix's local delivery defers it)."""
        self._full_ok = full_mailbox_ok
        try:
            return self._resolve(address, may_relay=may_relay)
        finally:
            self._full_ok = False

    def _resolve(self, address: Address, *, may_relay: bool) -> list[Destination] | Rejected:
        shown = format_address(address.local, address.domain)
        if address.is_null:
            return Rejected(501, "5.1.3", "<>: Recipient address rejected: Bad address syntax")
        if not address.domain:
            if address.local.casefold() != "postmaster":  # only <Postmaster> may lack a domain
                return Rejected(
                    501, "5.1.3", f"<{shown}>: Recipient address rejected: Bad address syntax"
                )
            result = self._postmaster(())
        elif self._store.is_local_domain(address.domain):
            result = self._local(address.local, normalize_domain(address.domain), ())
        elif may_relay:
            return [RemoteDelivery(shown)]
        else:
            return Rejected(554, "5.7.1", f"<{shown}>: Relay access denied")
        if isinstance(result, list):
            return _dedupe(result)
        return _rejection(result, shown)

    def check_size(self, dest: Destination, size: int) -> Rejected | None:
        """Refuse a message of *size* octets (SIZE=, RFC 1870, or the real size after DATA)
        that would take a mailbox past its quota; None when it fits."""
        if not isinstance(dest, LocalDelivery) or dest.quota <= 0:
            return None
        if self._usage(dest.maildir, dest.quota, size) + size > dest.quota:
            return Rejected(
                552, "5.2.2", f"<{dest.mailbox}>: Recipient address rejected: Mailbox full"
            )
        return None

    # --- lookups ---

    def _address(self, local: str, domain: str, path: tuple[str, ...]) -> _Result:
        """An alias member or the configured postmaster: local or remote, no relay check (the
        administrator chose it)."""
        if self._store.is_local_domain(domain):
            return self._local(local, normalize_domain(domain), path)
        return [RemoteDelivery(format_address(local, domain))]

    def _local(self, local: str, domain: str, path: tuple[str, ...]) -> _Result:
        user = self._store.get_user(f"{local}@{domain}")
        if user is not None:
            return self._mailbox(user)
        found = self._alias(local, domain, path)
        if found is not None:
            return found
        base = self._base(local)
        if base is not None:
            user = self._store.get_user(f"{base}@{domain}")
            if user is not None:
                return self._mailbox(user)
            found = self._alias(base, domain, path)
            if found is not None:
                return found
        found = self._alias("", domain, path)
        if found is not None:
            return found
        if local.casefold() == "postmaster":
            return self._postmaster(path)
        return _Fail.UNKNOWN

    def _base(self, local: str) -> str | None:
        """``user`` for ``user+tag`` (the first delimiter character found, not at the start)."""
        delimiters = self.delivery.recipient_delimiter
        cut = min((i for i, ch in enumerate(local) if ch in delimiters), default=-1)
        return local[:cut] if cut > 0 else None

    def _mailbox(self, user: User) -> _Result:
        # Full when not one more octet fits; the size is not known yet (no SIZE=, or later).
        if (user.quota > 0 and not self._full_ok
                and self._usage(user.maildir, user.quota, 1) >= user.quota):
            return _Fail.FULL
        return [LocalDelivery(mailbox=user.address, maildir=user.maildir, quota=user.quota)]

    def _alias(self, local: str, domain: str, path: tuple[str, ...]) -> _Result | None:
        """The expansion of alias ``local@domain`` (``@domain`` for local=""); None if none."""
        source = f"{local}@{domain}"
        targets = self._store.alias_targets(source)
        if not targets:
            return None
        key = address_key(local, domain)
        if key in path or len(path) >= self.delivery.alias_max_depth:
            return _Fail.LOOP
        path = (*path, key)
        found: list[Destination] = []
        first_failure: _Fail | None = None
        for target in targets:
            target_local, _, target_domain = target.rpartition("@")
            result = self._address(target_local, target_domain, path)
            if result is _Fail.LOOP:
                return result
            if isinstance(result, _Fail):
                log.event(
                    None,
                    logging.WARNING,
                    alias=source,
                    to=target,
                    status="skipped",
                    status_detail=f"alias member {result.value}",
                )
                first_failure = first_failure or result
                continue
            found.extend(result)
        return found if found else (first_failure or _Fail.UNKNOWN)

    def _postmaster(self, path: tuple[str, ...]) -> _Result:
        if _POSTMASTER in path:
            return [self._builtin_postmaster()]
        path = (*path, _POSTMASTER)
        configured = self.delivery.postmaster.strip()
        if configured:
            local, at, domain = configured.rpartition("@")
            result: _Result = _Fail.UNKNOWN
            if at and local and domain:
                result = self._address(local, domain, path)
            if isinstance(result, list):
                return result
            log.event(
                None,
                logging.WARNING,
                to=configured,
                status="unusable",
                status_detail=f"delivery.postmaster: {result.value}; using the built-in mailbox",
            )
            return [self._builtin_postmaster()]
        domains = self._store.list_domains()
        if domains:
            result = self._local("postmaster", domains[0], path)
            if isinstance(result, list):
                return result
        return [self._builtin_postmaster()]

    def _builtin_postmaster(self) -> LocalDelivery:
        maildir = self._data_dir / "postmaster"
        try:
            for sub in ("cur", "new", "tmp"):
                (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"{maildir}: cannot make the postmaster Maildir: {exc.strerror}",
                disk_full=exc.errno == errno.ENOSPC,
            ) from None
        return LocalDelivery(mailbox="postmaster", maildir=maildir)


def _dedupe(destinations: list[Destination]) -> list[Destination]:
    seen: set[tuple[str, str]] = set()
    unique: list[Destination] = []
    for dest in destinations:
        if isinstance(dest, LocalDelivery):
            key = ("local", str(dest.maildir))
        else:
            local, _, domain = dest.address.rpartition("@")
            key = ("remote", f"{local}@{normalize_domain(domain)}")
        if key not in seen:
            seen.add(key)
            unique.append(dest)
    return unique


def _rejection(failure: _Fail, shown: str) -> Rejected:
    if failure is _Fail.LOOP:
        return Rejected(
            554, "5.4.6", f"<{shown}>: Recipient address rejected: alias expansion loop"
        )
    if failure is _Fail.FULL:
        return Rejected(552, "5.2.2", f"<{shown}>: Recipient address rejected: Mailbox full")
    return Rejected(
        550,
        "5.1.1",
        f"<{shown}>: Recipient address rejected: User unknown in virtual mailbox table",
    )
