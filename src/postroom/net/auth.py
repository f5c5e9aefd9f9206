"""Logins for every protocol: the SASL exchange's I/O side, brute-force throttling and its log.

The SASL mechanisms (``postroom.sasl``) are sans-I/O; this service gives them what they need
from outside (the credential store, nonces, the clock, a server secret) and does the parts that
take time: argon2 checks run in worker threads, at most ``auth.max_parallel_checks`` at once per
process (each takes 64 MiB at the default cost, so a login flood must not take the memory), and
failure replies wait for the throttle's delay. SMTP AUTH uses it now; POP3 and IMAP logins go
through the same service, so one client address has one failure count for all of them.

The throttle is asked right before each look at the credentials, not once per exchange (see
:mod:`postroom.policy.authlimit`): :meth:`AuthService.reserve` before every step a mechanism may
judge a proof in (SCRAM's client-final, CRAM-MD5's response), and :meth:`AuthService.verify`
again once an argon2 slot is free, so neither a client parked at a password prompt nor one of many
connections queued for a slot has its guess checked after the address was blocked. The attempt
is counted when it is reserved; a success or a step that judged nothing gives it back.

Log lines, in the shape fail2ban's stock ``postfix-sasl`` filter reads (``contrib/fail2ban``
has a filter for postroom's own process name)::

    warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: bad credentials
    warning: unknown[192.0.2.7]: too many failed authentications; refused for 900 s
    unknown[192.0.2.7]: SASL SCRAM-SHA-256 authentication succeeded, sasl_username=alice@example.com

A password never appears in a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from postroom import log
from postroom.config import AuthSection
from postroom.errors import StorageError
from postroom.policy.authlimit import AuthThrottle, Reservation, ThrottleSettings, Verdict
from postroom.sasl import (
    CredentialStore,
    Exchange,
    Failure,
    FailureKind,
    PasswordCheck,
    SaslSettings,
    Success,
    open_exchange,
)

#: Failures that count against the client: a wrong password above all. A cancel or a failure
#: on our side (the store was down) is not the client's fault.
_COUNTED = frozenset({FailureKind.REJECTED, FailureKind.MALFORMED, FailureKind.TOO_LONG,
                      FailureKind.INITIAL_RESPONSE_REFUSED})


@runtime_checkable
class AccountDirectory(Protocol):
    """A credential store that also knows each account's own spelling of its address
    (:class:`postroom.accounts.credentials.AccountCredentials`)."""

    def account_address(self, authcid: str) -> str | None: ...


def account_name(store: CredentialStore, authcid: str) -> str:
    """The logged-in account's address as stored, when *store* can tell (a user who typed
    ``Alice@Example.COM.`` is ``alice@example.com``); else *authcid* as received."""
    if isinstance(store, AccountDirectory):
        try:
            name = store.account_address(authcid)
        except StorageError:  # it answered a moment ago; keep the name as given
            name = None
        if name is not None:
            return name
    return authcid


@dataclass(frozen=True, slots=True)
class Checked:
    """What :meth:`AuthService.verify` did with a password check.

    - ``reservation`` None: the client had left by the time a slot was free; nothing was checked
      or counted.
    - ``reservation.granted`` false: the address is blocked (``reservation.blocked_for``); nothing
      was checked: answer ``421 4.7.0`` and close.
    - otherwise *ok* is the check's result, and *reservation* is settled by
      :meth:`AuthService.failed` / :meth:`AuthService.succeeded` (or released).
    """

    ok: bool = False
    reservation: Reservation | None = None


def throttle_settings(auth: AuthSection) -> ThrottleSettings:
    """The ``[auth]`` section's brute-force knobs as the throttle takes them."""
    return ThrottleSettings(
        ip_free_failures=auth.ip_free_failures,
        ip_max_failures=auth.ip_max_failures,
        ip_half_life=auth.ip_half_life,
        block_seconds=auth.block_seconds,
        ip_delay_max=auth.max_delay,
        account_free_failures=auth.account_free_failures,
        account_half_life=auth.account_half_life,
        account_delay_max=auth.max_delay,
    )


def _printable(text: str) -> str:
    """Client-chosen text made safe for one log line."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:320]


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class AuthService:
    """One per process; shared by every listener and protocol."""

    def __init__(
        self,
        *,
        credentials: CredentialStore,
        throttle: AuthThrottle,
        hostname: str,
        decoy_secret: bytes,
        mechanisms: Sequence[str],
        scram_iterations: int,
        max_parallel_checks: int,
        allow_plaintext_on_loopback: bool = False,
        decoy_hash: str | None = None,
    ) -> None:
        self.throttle = throttle
        self.mechanisms = list(mechanisms)
        self.allow_plaintext_on_loopback = allow_plaintext_on_loopback
        self.settings = SaslSettings(
            credentials=credentials,
            hostname=hostname,
            nonce=lambda: secrets.token_urlsafe(18),
            clock=time.time,
            decoy_secret=decoy_secret,
            scram_iterations=scram_iterations,
            decoy_hash=decoy_hash,
        )
        self._max_parallel = max_parallel_checks
        self._checks: asyncio.Semaphore | None = None  # made on the loop that uses it

    def reconfigure(self, auth: AuthSection) -> None:
        """A reloaded ``[auth]``: mechanisms and the loopback switch, for new sessions (the
        throttle's numbers and the check pool size need a restart)."""
        self.mechanisms = list(auth.mechanisms)
        self.allow_plaintext_on_loopback = auth.allow_plaintext_on_loopback

    def requires_tls(self, address: str) -> bool:
        """Credentials cross only TLS, unless the operator allowed plaintext from loopback."""
        return not (self.allow_plaintext_on_loopback and is_loopback(address))

    def open(self, mechanism: str) -> Exchange | None:
        return open_exchange(mechanism, self.settings, offered=self.mechanisms)

    def blocked(self, address: str) -> float:
        """Seconds this address must still wait before it may try again; 0: it may."""
        return self.throttle.check(address, time.monotonic()).blocked_for

    def reserve(self, address: str) -> Reservation:
        """Right before a step that may judge credentials: refused while *address* is blocked,
        else the attempt is counted until settled (:meth:`failed`, :meth:`succeeded`,
        :meth:`release`)."""
        return self.throttle.reserve(address, time.monotonic())

    def release(self, address: str, reservation: Reservation) -> None:
        """Give back a reservation whose step judged nothing (a challenge, the client left)."""
        self.throttle.release(address, reservation, time.monotonic())

    def account_name(self, authcid: str) -> str:
        """See :func:`account_name`."""
        return account_name(self.settings.credentials, authcid)

    async def verify(self, check: PasswordCheck, address: str,
                     gone: Callable[[], bool] | None = None) -> Checked:
        """Run an argon2 check in a worker thread, a bounded number at a time.

        The throttle is asked once the slot is taken, not before: a guess that waited behind
        others is not checked if their failures blocked the address meanwhile. A client that left
        while waiting (*gone* says so) costs no check.
        """
        if self._checks is None:
            self._checks = asyncio.Semaphore(self._max_parallel)
        async with self._checks:
            if gone is not None and gone():
                return Checked()
            reservation = self.reserve(address)
            if not reservation.granted:
                return Checked(reservation=reservation)
            try:
                ok = await asyncio.to_thread(check.check)
            except BaseException:
                self.release(address, reservation)
                raise
            return Checked(ok, reservation)

    def record_failure(self, client: str, address: str, mechanism: str, failure: Failure,
                       reservation: Reservation | None = None) -> Verdict | None:
        """Log and count one failed exchange at once (no waiting); None when it does not count
        against the client (its reservation is then given back)."""
        account = failure.authcid or ""
        if failure.kind not in _COUNTED:  # not the client's guess: no fail2ban-shaped line
            if reservation is not None:
                self.release(address, reservation)
            log.logger.info("%s: SASL %s authentication ended: %s", client, mechanism,
                            failure.reason)
            return None
        # The user name goes on a line of its own: fail2ban's filters expect the failure line
        # to end after the reason, and a user name is client-chosen text.
        log.logger.warning("%s: SASL %s authentication failed: %s", client, mechanism,
                           failure.reason)
        if account:
            log.logger.info("%s: failed login, sasl_username=%s", client, _printable(account))
        verdict = self.throttle.failure(address, account, time.monotonic(), reservation)
        if verdict.just_blocked:  # once per block, though several workers may see it
            log.logger.warning("%s: too many failed authentications; refused for %d s",
                               client, round(verdict.blocked_for))
        return verdict

    async def failed(self, client: str, address: str, mechanism: str, failure: Failure,
                     reservation: Reservation | None = None) -> bool:
        """Log and count one failed exchange, wait out its delay; True when the address is
        now refused (the caller says 421/BYE and disconnects)."""
        verdict = self.record_failure(client, address, mechanism, failure, reservation)
        if verdict is None:
            return False
        if verdict.blocked:
            return True
        if verdict.delay > 0:
            await asyncio.sleep(verdict.delay)
        return False

    def succeeded(self, client: str, address: str, mechanism: str, success: Success,
                  reservation: Reservation | None = None) -> str:
        """Record a login; the account's address as stored (:meth:`account_name`), which the
        throttle's account count and the session's user are keyed by."""
        account = self.account_name(success.authcid)
        self.throttle.success(address, account, time.monotonic(), reservation)
        log.logger.info("%s: SASL %s authentication succeeded, sasl_username=%s", client,
                        mechanism, _printable(account))
        return account


class LoginThrottleAdapter:
    """The shared throttle as POP3 sessions ask it (``net.pop3.LoginThrottle`` and
    ``net.pop3.LoginReservations``): the same counts as SMTP AUTH, so one address has one failure
    count for every protocol."""

    def __init__(self, throttle: AuthThrottle) -> None:
        self.throttle = throttle

    def blocked(self, client: str, user: str | None) -> bool:
        return self.throttle.check(client, time.monotonic()).blocked

    def reserve(self, client: str) -> Reservation:
        return self.throttle.reserve(client, time.monotonic())

    def release(self, client: str, reservation: Reservation) -> None:
        self.throttle.release(client, reservation, time.monotonic())

    def verdict(self, client: str, user: str | None,
                reservation: Reservation | None = None) -> Verdict:
        """Count a failed login (its reservation, if any, already counted the address)."""
        verdict = self.throttle.failure(client, user or "", time.monotonic(), reservation)
        if verdict.just_blocked:
            log.logger.warning("unknown[%s]: too many failed authentications; refused for %d s",
                               client, round(verdict.blocked_for))
        return verdict

    def failure(self, client: str, user: str | None) -> float:
        return self.verdict(client, user).delay

    def success(self, client: str, user: str, reservation: Reservation | None = None) -> None:
        self.throttle.success(client, user, time.monotonic(), reservation)
