"""Brute-force protection for authentication: failures counted per client and per account.

What it does (issue 3, item 4):

* **Per client IP.** Failures are counted per client address. The first
  :attr:`~ThrottleSettings.ip_free_failures` cost nothing; after them each failure reply is held
  back by a delay that grows and is capped; once the count reaches
  :attr:`~ThrottleSettings.ip_max_failures` the address is *blocked* for
  :attr:`~ThrottleSettings.block_seconds`: its AUTH commands get ``421 4.7.0`` and the connection
  is closed (RFC 3463 X.7.0, "other or undefined security status"; 421 closes the channel per RFC
  5321 3.8). An IPv4 address counts alone; IPv6 addresses count per /64, because one host on a
  SLAAC network, and any subscriber line (RFC 6177 has end sites get a /64 or more), can
  otherwise rotate through 2**64 fresh addresses.
* **Per account.** Failures for one account, from any address, only delay further *failure*
  replies. An account is never locked: a lock would let anyone who knows a user name shut that
  user out. A correct password is never delayed, and it clears the account's count (not the
  address's: an attacker holding one valid account must not wash their address clean by logging
  in to it).

How the transport uses it (SMTP AUTH, POP3, later IMAP), with ``now = time.monotonic()``:

1. Right before *every* look at the credentials (each password check, each SCRAM or CRAM-MD5
   proof, not once when AUTH starts), ``attempt = throttle.reserve(ip, now)``. If
   ``not attempt.granted``, the address is blocked: answer ``421 4.7.0`` and close, *whatever the
   password*; checking it anyway would let a blocked client keep guessing and learn the right
   password from the answer. A client parked at a password prompt, or one of many parallel
   connections queued for an argon2 slot, asks at its turn, not when its exchange began.
2. Wrong password: ``verdict = throttle.failure(ip, account, now, attempt)`` first, then
   ``await asyncio.sleep(verdict.delay)``, then the failure reply (``535 5.7.8``, RFC 4954 6).
   Recording before sleeping matters: a client that hangs up during the delay to try again on a
   fresh connection has still been counted. If ``verdict.blocked``, send ``421 4.7.0`` at once
   and close instead (``delay`` is then 0: nothing is gained by holding a connection we are about
   to drop).
3. Right password: ``throttle.success(ip, account, now, attempt)``, and answer ``235`` at once.
4. Nothing was judged (the step only produced a challenge, the client left, our store failed):
   ``throttle.release(ip, attempt, now)``.

**Reservations.** :meth:`~AuthThrottle.reserve` counts the attempt as a failure *before* the
check, atomically with the block test, and a success or a release gives it back. So attempts in
flight count: thirty parallel guesses from one address cannot all pass the test before the first
of them is recorded; exactly ``ip_max_failures`` are let through and the one that reaches the limit
sets the block (it is still checked: the limit is "blocked *at* the tenth failure"). A success
gives the count back and lifts the block its reservation set (unless something else has since
renewed it). A reservation whose process dies before settling it is never given back; it decays
like any failure.

The delay slows one connection, not an attacker: a client may open several connections at once,
or give up waiting and reconnect. The count, shared by every connection and every worker, is what
bounds the guessing rate; ``smtp.max_connections_per_ip`` bounds the parallelism.

**Forgetting: exponential decay.** Each failure adds 1 to a score that halves every
``*_half_life`` seconds, computed lazily from the score and the time it was last updated, so a key
needs two numbers and no list of timestamps. Unlike a fixed window there is no boundary at which
the whole count resets at once (a client cannot burst twice the limit across the edge), and
unlike a linear leaky bucket the forgetting is proportional: a big burst fades quickly at first
and a handful of old typos is soon near zero, while one recent failure still counts fully. It is
also additive, so "more failures" always means "a higher score": the verdicts are monotone in the
failures, and two keys that share a slot (see :class:`SharedThrottle`) can only add up to a
stricter limit. A score that has decayed below 0.01 is dropped as zero.

fail2ban
--------
The transport logs one line per *counted* failure, at warning level, in Postfix's shape and
without the user name or any other client-chosen text beyond the mechanism (people type passwords
into the user name field; a user name, if logged, goes on a separate info line)::

    warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: rejected

``unknown`` or the client's verified host name, the address in brackets (IPv6 as is), the
mechanism's IANA name, and a reason of letters, digits, spaces, ``:`` and ``-``. :mod:`postroom.log`
writes it after a syslog-like prefix, ``Nov 29 22:13:18 mx postroom[4421]: `` (JSON logs are not
for fail2ban). A failure that is not counted here (a cancelled exchange, our credential store
being down) should not use this wording, or fail2ban would punish clients for our outage.

When a failure blocks the address, one distinct line, logged once (:attr:`Verdict.just_blocked`
is true in exactly one worker, even when failures race)::

    warning: unknown[192.0.2.7]: too many failed authentications; refused for 600 s

AUTH commands refused while the block lasts are not failures and are best logged at info level,
so that they feed no jail.

Checked with fail2ban-regex 1.0.2 on lines written by :mod:`postroom.log`: the *failregex* of
fail2ban's stock ``postfix`` filter in ``mode=auth`` (the ``postfix-sasl`` jail) matches the
failure line from ``unknown[`` on, but the filter also wants a syslog tag like ``postfix/smtpd``
and knows only LOGIN, PLAIN, CRAM-MD5 and DIGEST-MD5. So either name the daemon::

    [postfix-sasl]
    enabled = true
    filter  = postfix[mode=auth, _daemon=postroom]

or, to catch SCRAM-SHA-256 and the block line too, use ``contrib/fail2ban/filter.d/postroom.conf``.
A jail with ``maxretry = 1`` on the block line alone moves postroom's block into the firewall for
longer.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import mmap
import multiprocessing
import secrets
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from postroom.accounts.store import address_key

#: Longer names are no address (RFC 5321 4.5.3.1: local part 64, "@", domain 255): counted as
#: typed, without parsing.
MAX_ACCOUNT_CHARS = 320

#: A decayed score below this is taken as zero: the key is forgotten.
FORGET_BELOW = 0.01

#: Slack for floating point when a score is compared with a threshold. Scores are sums of
#: powers of two computed stepwise; without slack, 10 failures could add up to 9.999999999999998.
_SLACK = 1e-9
#: How far below the threshold a decayed score may be and still block: N failures in a burst
#: have decayed a little by the Nth, and "10 failures block at the tenth" should hold for
#: failures seconds apart, not only microseconds apart (with a 600 s half-life, ten failures
#: within half a minute add up to more than 9.75).
_BLOCK_SLACK = 0.25

#: No delay may exceed this. RFC 5321 4.5.3.2 has clients wait minutes for a reply (5 for MAIL and
#: RCPT, 2 for DATA); AUTH has no timer of its own, and a longer delay would read as a dead server.
_LONGEST_DELAY = 300.0


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    """Limits for authentication failures. The defaults suit a server with human users.

    The delays of the ``n``-th failure beyond the free ones are ``base * growth ** (n - 1)``,
    capped. With the defaults one client address sees failure replies after 0, 0, 0, 1, 2, 4, 8,
    15, 15 seconds and is blocked at the tenth failure; one account, from any number of addresses,
    sees 0 (five times), 1, 2, 4, 8, 15, 15, ... and is never blocked.
    """

    ip_free_failures: int = 3
    """Failures from one address that are answered without delay. Three covers a user mistyping
    a password a few times, and a mail client that retries a just-changed password once or twice,
    without any visible punishment."""

    ip_max_failures: int = 10
    """The (decayed) failure count at which the address is blocked. Ten within about ten minutes
    is twice fail2ban's usual ``maxretry = 5`` per ``findtime = 10m``: lenient enough for a
    household or office behind one NAT address with one misconfigured client, far too few for
    password guessing."""

    ip_half_life: float = 600.0
    """Seconds in which an address's failure count halves. With ten minutes, a client that
    retries a stale password every five minutes settles near 3.4 and is never blocked, while
    sustained guessing without ever being blocked is held below about one attempt in 90 seconds
    (fail2ban's defaults let one in 150 seconds through), each held back by the delays."""

    block_seconds: float = 600.0
    """How long a blocked address is refused: ten minutes, fail2ban's default ``bantime``. When it
    ends, the count has only halved, so a client that goes on failing is blocked again after
    about five more failures."""

    ip_delay_base: float = 1.0
    """Delay of the first failure reply beyond the free ones, in seconds (Postfix's
    ``smtpd_error_sleep_time`` is 1 s)."""

    ip_delay_growth: float = 2.0
    """Factor by which the delay grows with each further failure."""

    ip_delay_max: float = 15.0
    """Cap of the per-address delay. Well under the minutes RFC 5321 4.5.3.2 has clients wait for
    a reply, so a delayed failure still reads as a failure, not as a dead server."""

    account_free_failures: int = 5
    """Failures for one account, counted over all addresses, that are answered without delay.
    Higher than per address, because the account's count gathers the user's own devices, with a
    stale password on one of them."""

    account_half_life: float = 1800.0
    """Seconds in which an account's failure count halves. A long memory costs the user nothing:
    the count only delays failures, and the right password clears it."""

    account_delay_base: float = 1.0
    """Delay of the first failure reply beyond the account's free failures, in seconds. Dovecot
    holds every failure for ``auth_failure_delay = 2 s``; here a legitimate user's first few
    mistakes are not held at all."""

    account_delay_growth: float = 2.0
    """Factor by which the account delay grows with each further failure."""

    account_delay_max: float = 15.0
    """Cap of the per-account delay (see :attr:`ip_delay_max`)."""

    def __post_init__(self) -> None:
        if self.ip_free_failures < 0 or self.account_free_failures < 0:
            raise ValueError("free failures must not be negative")
        if self.ip_max_failures <= self.ip_free_failures:
            raise ValueError("ip_max_failures must be greater than ip_free_failures")
        for name in ("ip_half_life", "account_half_life", "block_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        # A reply held for more than five minutes is a timeout, not a delay (see _LONGEST_DELAY).
        for name in ("ip_delay_max", "account_delay_max"):
            if not 0 <= getattr(self, name) <= _LONGEST_DELAY:
                raise ValueError(f"{name} must lie between 0 and {_LONGEST_DELAY:g} seconds")
        for name in ("ip_delay_base", "account_delay_base"):
            value = getattr(self, name)
            if not (value == 0 or 0.001 <= value <= _LONGEST_DELAY):
                raise ValueError(f"{name} must be 0 or lie between 0.001 and {_LONGEST_DELAY:g} seconds")
        for name in ("ip_delay_growth", "account_delay_growth"):
            if not 1 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} must lie between 1 and 100")

    def ip_delay(self, failures: float) -> float:
        """The delay for an address whose count, this failure included, is *failures*."""
        return _escalate(failures, self.ip_free_failures, self.ip_delay_base, self.ip_delay_growth,
                         self.ip_delay_max)

    def account_delay(self, failures: float) -> float:
        """The delay for an account whose count, this failure included, is *failures*."""
        return _escalate(failures, self.account_free_failures, self.account_delay_base,
                         self.account_delay_growth, self.account_delay_max)


def _escalate(failures: float, free: int, base: float, growth: float, cap: float) -> float:
    excess = failures - free
    if excess <= _SLACK or base <= 0.0 or cap <= 0.0:
        return 0.0
    steps = math.ceil(excess - _SLACK) - 1  # 0 for the first failure beyond the free ones
    if growth > 1.0:
        # Beyond this many steps the cap holds anyway; stopping here keeps growth ** steps finite
        # (the settings keep cap / base below 300 / 0.001).
        steps = min(steps, max(0, math.ceil(math.log(max(cap, base) / base, growth))))
    return min(cap, base * growth**steps)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the transport should do now."""

    delay: float = 0.0
    """Seconds to wait before sending the failure reply (0 from :meth:`AuthThrottle.check`, and
    0 when :attr:`blocked`)."""

    blocked_for: float = 0.0
    """Seconds the address stays blocked; 0 when it is not."""

    just_blocked: bool = False
    """This failure blocked the address: log the ``AUTH blocked`` line (once, in one worker)."""

    ip_failures: float = 0.0
    """The address's decayed failure count, for logs."""

    account_failures: float = 0.0
    """The account's decayed failure count, for logs (0 for :meth:`AuthThrottle.check`)."""

    @property
    def blocked(self) -> bool:
        """The address is blocked: answer ``421 4.7.0`` and close."""
        return self.blocked_for > 0.0

    @property
    def allowed(self) -> bool:
        """The client may try to authenticate."""
        return not self.blocked


@dataclass(frozen=True, slots=True)
class Reservation:
    """One attempt counted before its credentials are checked (:meth:`AuthThrottle.reserve`).

    Settle it exactly once: :meth:`AuthThrottle.failure` (wrong), :meth:`AuthThrottle.success`
    (right) or :meth:`AuthThrottle.release` (nothing was judged). A refused reservation
    (``granted`` false) counted nothing and needs no settling.
    """

    granted: bool
    """The address was not blocked: the attempt was counted and may be checked."""

    blocked_for: float = 0.0
    """Refused: seconds the address stays blocked. Granted: seconds of the block this attempt set
    by reaching the limit (0 when it set none)."""

    stamp: float = 0.0
    """When the attempt was counted (its weight decays from then)."""

    set_until: float = 0.0
    """The ``blocked until`` this attempt wrote, 0 when it wrote none; a release lifts the block
    only while it still reads this value."""

    previous_until: tuple[float, ...] = ()
    """What ``blocked until`` read, per slot, before this attempt wrote it (restored on release)."""

    ip_failures: float = 0.0
    """The address's decayed count, this attempt included when granted."""


class AuthThrottle(Protocol):
    """Counts authentication failures; ``now`` is ``time.monotonic()`` in every process."""

    def check(self, ip: str, now: float) -> Verdict:
        """Is the client at *ip* blocked now? A look that counts nothing (for logs, for refusing
        early); the decision to check credentials is :meth:`reserve`'s."""

    def reserve(self, ip: str, now: float) -> Reservation:
        """Right before checking credentials: refused while *ip* is blocked; otherwise the attempt
        is counted now (it may set the block, and is still granted) and must be settled."""

    def failure(self, ip: str, account: str, now: float,
                reservation: Reservation | None = None) -> Verdict:
        """Record one failed authentication by *ip* for *account* (``""`` when no account name was
        given or it could not be parsed: then only the address counts). With a granted
        *reservation* the address was counted already: only the account is added."""

    def success(self, ip: str, account: str, now: float,
                reservation: Reservation | None = None) -> None:
        """Record a successful authentication: clears the account's count, not the address's;
        gives a granted *reservation* back (:meth:`release`)."""

    def release(self, ip: str, reservation: Reservation, now: float) -> None:
        """Give a granted reservation back: its count, and the block it set if nothing renewed it."""


def ip_key(address: str) -> str:
    """The key *address* is counted under: IPv4 as is, IPv6 as its /64.

    An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, RFC 4291 2.5.5.2, as seen on a dual-stack
    socket) counts as the IPv4 address; a zone (``fe80::1%eth0``) is dropped. Text that is not an
    address (a Unix socket's empty peer) is kept as it is, so all such clients share one count.
    """
    text = address.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        parsed = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return text.lower()
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


def account_key(account: str) -> str:
    """The key *account* is counted under: the accounts store's lookup key for an address
    (:func:`postroom.accounts.store.address_key`: local part case-folded, domain canonical, so
    ``Alice@Example.ORG``, ``alice@example.org.`` and ``alice@xn--...`` share one count with the
    account they log in to), else the name trimmed and case-folded. Merging two names can only
    make a count stricter."""
    name = account.strip()
    local, at, domain = name.rpartition("@")
    if not at or len(name) > MAX_ACCOUNT_CHARS:  # not an address; too long to be one
        return name.casefold()
    return address_key(local, domain)


def _decayed(score: float, stamp: float, now: float, half_life: float) -> float:
    """*score*, last updated at *stamp*, as it stands at *now*."""
    elapsed = now - stamp
    if elapsed > 0.0:
        score *= 0.5 ** (elapsed / half_life)
    return score if score >= FORGET_BELOW else 0.0


def _digest(key: str, salt: bytes = b"") -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16, key=salt).digest()


class _Cell:
    """One key's state in :class:`LocalThrottle`."""

    __slots__ = ("blocked_until", "score", "stamp")

    def __init__(self) -> None:
        self.score = 0.0
        self.stamp = 0.0
        self.blocked_until = 0.0


class LocalThrottle:
    """The counts of one process, exact per key, in bounded memory.

    Each table (addresses, accounts) holds at most *max_entries* keys; a new key beyond that
    evicts the one updated longest ago, so a spray of fresh addresses or invented account names
    cannot grow memory without bound (an evicted key starts again from zero, which is why the bound
    should stay well above the number of addresses that fail in one half-life). Keys are kept as
    16-byte digests, so a 10 kB user name costs no more than a short one.
    """

    def __init__(self, settings: ThrottleSettings | None = None, *, max_entries: int = 65536) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.settings = settings or ThrottleSettings()
        self._max = max_entries
        self._ips: OrderedDict[bytes, _Cell] = OrderedDict()
        self._accounts: OrderedDict[bytes, _Cell] = OrderedDict()
        self._lock = threading.Lock()  # the password check may run on worker threads

    @property
    def entries(self) -> tuple[int, int]:
        """How many (addresses, accounts) are held."""
        return len(self._ips), len(self._accounts)

    def _touch(self, table: OrderedDict[bytes, _Cell], key: bytes, now: float, half_life: float) -> _Cell:
        """The cell of *key* with its score decayed to *now*, created (evicting) if missing."""
        cell = table.get(key)
        if cell is None:
            while len(table) >= self._max:
                table.popitem(last=False)
            cell = table[key] = _Cell()
        else:
            table.move_to_end(key)
        cell.score = _decayed(cell.score, cell.stamp, now, half_life)
        cell.stamp = max(cell.stamp, now)
        return cell

    def check(self, ip: str, now: float) -> Verdict:
        key = _digest(ip_key(ip))
        with self._lock:
            cell = self._ips.get(key)
            if cell is None:
                return Verdict()
            score = _decayed(cell.score, cell.stamp, now, self.settings.ip_half_life)
            return Verdict(blocked_for=max(0.0, cell.blocked_until - now), ip_failures=score)

    def reserve(self, ip: str, now: float) -> Reservation:
        s = self.settings
        key = _digest(ip_key(ip))
        with self._lock:
            cell = self._ips.get(key)
            if cell is not None and cell.blocked_until > now:
                return Reservation(False, blocked_for=cell.blocked_until - now,
                                   ip_failures=_decayed(cell.score, cell.stamp, now, s.ip_half_life))
            cell = self._touch(self._ips, key, now, s.ip_half_life)
            cell.score += 1.0
            previous, set_until = cell.blocked_until, 0.0
            if cell.score >= s.ip_max_failures - _BLOCK_SLACK:
                cell.blocked_until = set_until = now + s.block_seconds
            return Reservation(True, blocked_for=s.block_seconds if set_until else 0.0, stamp=now,
                               set_until=set_until, previous_until=(previous,), ip_failures=cell.score)

    def release(self, ip: str, reservation: Reservation, now: float) -> None:
        if not reservation.granted:
            return
        s = self.settings
        key = _digest(ip_key(ip))
        with self._lock:
            cell = self._ips.get(key)
            if cell is None:  # evicted meanwhile: nothing left to give back
                return
            _give_back(cell, reservation, 0, now, s.ip_half_life)

    def failure(self, ip: str, account: str, now: float,
                reservation: Reservation | None = None) -> Verdict:
        s = self.settings
        ikey = _digest(ip_key(ip))
        name = account_key(account)
        with self._lock:
            reserved = reservation is not None and reservation.granted and ikey in self._ips
            cell = self._touch(self._ips, ikey, now, s.ip_half_life)
            if reserved and reservation is not None:
                # counted (and the block, if any, set) by reserve(): the block is "just" new
                # when this attempt set it
                was_blocked = not reservation.set_until
            else:
                was_blocked = cell.blocked_until > now
                cell.score += 1.0
                if cell.score >= s.ip_max_failures - _BLOCK_SLACK:
                    cell.blocked_until = max(cell.blocked_until, now + s.block_seconds)
            ip_score, blocked_until = cell.score, cell.blocked_until
            account_score = 0.0
            if name:
                acell = self._touch(self._accounts, _digest(name), now, s.account_half_life)
                acell.score += 1.0
                account_score = acell.score
        return _verdict(s, ip_score, account_score, blocked_until, was_blocked, now)

    def success(self, ip: str, account: str, now: float,
                reservation: Reservation | None = None) -> None:
        if reservation is not None:
            self.release(ip, reservation, now)
        name = account_key(account)
        if name:
            with self._lock:
                self._accounts.pop(_digest(name), None)


def _weight(reservation: Reservation, now: float, half_life: float) -> float:
    """What the 1 a reservation added at its stamp is worth at *now*."""
    return math.pow(0.5, max(0.0, now - reservation.stamp) / half_life)


def _give_back(cell: _Cell, reservation: Reservation, index: int, now: float,
               half_life: float) -> None:
    """Take a reservation's count out of *cell* and lift the block it set, if still its own."""
    score = _decayed(cell.score, cell.stamp, now, half_life) - _weight(reservation, now, half_life)
    cell.score = score if score >= FORGET_BELOW else 0.0
    cell.stamp = max(cell.stamp, now)
    if reservation.set_until and cell.blocked_until == reservation.set_until:
        cell.blocked_until = reservation.previous_until[index]


def _verdict(s: ThrottleSettings, ip_score: float, account_score: float, blocked_until: float,
             was_blocked: bool, now: float) -> Verdict:
    blocked_for = max(0.0, blocked_until - now)
    delay = 0.0 if blocked_for > 0.0 else max(s.ip_delay(ip_score), s.account_delay(account_score))
    return Verdict(delay=delay, blocked_for=blocked_for, just_blocked=blocked_for > 0.0 and not was_blocked,
                   ip_failures=ip_score, account_failures=account_score)


#: One slot: decayed score, time of its last update, blocked until, owner (see SharedThrottle).
_SLOT = struct.Struct("=dddQ")
_MIXED = 0  # owner of a slot that holds (non-negligible) failures of more than one key
_HASHES = 2  # slots per key


class SharedThrottle:
    """Counts shared by forked worker processes: create it before forking.

    Two tables (addresses, accounts) of *slots* fixed-size slots live in one anonymous
    ``MAP_SHARED`` memory map, updated under one cross-process lock (as
    :class:`postroom.net.limits.SharedCounts`). The memory is fixed: ``2 * slots * 32`` bytes,
    2 MiB with the default 32768.

    Each key is hashed, with a secret drawn at construction, to two slots, and a failure is
    added to both. A key's count is the *smaller* of the two (a count-min sketch): every slot
    holds the key's own failures plus, at most, those of keys that collide with it, so the count
    can only be too high, and with two slots it is too high only if both collide. An innocent
    address thus shares a blocked attacker's fate only if both its slots do, and the secret keeps
    an attacker from choosing addresses or names that land on a victim's slots.

    Clearing an account on success must not clear a colliding account's failures. So each slot
    remembers its *owner*, a 64-bit fingerprint of the only key whose failures it holds, or
    ``_MIXED`` once a second key has added to it; success clears only the slots the account owns.
    A slot whose score has decayed to zero is free for a new owner.
    """

    def __init__(self, settings: ThrottleSettings | None = None, *, slots: int = 32768) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.settings = settings or ThrottleSettings()
        self._slots = slots
        self._map = mmap.mmap(-1, 2 * slots * _SLOT.size, flags=mmap.MAP_SHARED)
        self._lock = multiprocessing.get_context("fork").Lock()
        self._salt = secrets.token_bytes(16)  # inherited by the forked workers

    def _locate(self, key: str, table: int) -> tuple[int, tuple[int, ...]]:
        """(fingerprint, byte offsets of the distinct slots) of *key* in *table* (0 or 1)."""
        digest = _digest(key, self._salt)
        owner = int.from_bytes(digest[:8], "little") or 1
        base = table * self._slots
        offsets = dict.fromkeys(
            (base + int.from_bytes(digest[8 + 4 * i : 12 + 4 * i], "little") % self._slots) * _SLOT.size
            for i in range(_HASHES)
        )
        return owner, tuple(offsets)

    def _read(self, offset: int, now: float, half_life: float) -> tuple[float, float, int]:
        """(score decayed to *now*, blocked until, owner) of the slot at *offset*."""
        score, stamp, blocked_until, owner = _SLOT.unpack_from(self._map, offset)
        return _decayed(score, stamp, now, half_life), blocked_until, owner

    def _add(self, offset: int, owner: int, now: float, half_life: float) -> tuple[float, float]:
        """Add one failure of the key *owner* to a slot; return its (score, blocked until)."""
        score, stamp, blocked_until, slot_owner = _SLOT.unpack_from(self._map, offset)
        score = _decayed(score, stamp, now, half_life)
        if score == 0.0:
            slot_owner = owner
        elif slot_owner != owner:
            slot_owner = _MIXED
        score += 1.0
        _SLOT.pack_into(self._map, offset, score, max(stamp, now), blocked_until, slot_owner)
        return score, blocked_until

    def _block(self, offset: int, until: float) -> None:
        score, stamp, blocked_until, owner = _SLOT.unpack_from(self._map, offset)
        _SLOT.pack_into(self._map, offset, score, stamp, max(blocked_until, until), owner)

    def check(self, ip: str, now: float) -> Verdict:
        _, offsets = self._locate(ip_key(ip), 0)
        with self._lock:
            seen = [self._read(offset, now, self.settings.ip_half_life) for offset in offsets]
        score = min(score for score, _, _ in seen)
        blocked_until = min(until for _, until, _ in seen)
        return Verdict(blocked_for=max(0.0, blocked_until - now), ip_failures=score)

    def reserve(self, ip: str, now: float) -> Reservation:
        s = self.settings
        owner, offsets = self._locate(ip_key(ip), 0)
        with self._lock:
            seen = [self._read(offset, now, s.ip_half_life) for offset in offsets]
            blocked_until = min(until for _, until, _ in seen)
            if blocked_until > now:
                return Reservation(False, blocked_for=blocked_until - now,
                                   ip_failures=min(score for score, _, _ in seen))
            previous = tuple(until for _, until, _ in seen)
            score = min(self._add(offset, owner, now, s.ip_half_life)[0] for offset in offsets)
            set_until = 0.0
            if score >= s.ip_max_failures - _BLOCK_SLACK:
                set_until = now + s.block_seconds
                for offset in offsets:
                    self._block(offset, set_until)
        return Reservation(True, blocked_for=s.block_seconds if set_until else 0.0, stamp=now,
                           set_until=set_until, previous_until=previous, ip_failures=score)

    def release(self, ip: str, reservation: Reservation, now: float) -> None:
        if not reservation.granted:
            return
        half_life = self.settings.ip_half_life
        weight = _weight(reservation, now, half_life)
        _, offsets = self._locate(ip_key(ip), 0)
        with self._lock:
            for index, offset in enumerate(offsets):
                score, stamp, blocked_until, owner = _SLOT.unpack_from(self._map, offset)
                score = _decayed(score, stamp, now, half_life) - weight
                if score < FORGET_BELOW:
                    score = 0.0
                # Only the block this reservation wrote, still unchanged, is lifted: a slot
                # shared with a key blocked since keeps that key's block.
                if reservation.set_until and blocked_until == reservation.set_until:
                    blocked_until = reservation.previous_until[index]
                _SLOT.pack_into(self._map, offset, score, max(stamp, now), blocked_until, owner)

    def failure(self, ip: str, account: str, now: float,
                reservation: Reservation | None = None) -> Verdict:
        s = self.settings
        ip_owner, ip_offsets = self._locate(ip_key(ip), 0)
        name = account_key(account)
        account_slots = self._locate(name, 1) if name else None
        with self._lock:
            if reservation is not None and reservation.granted:  # counted by reserve() already
                seen = [self._read(offset, now, s.ip_half_life) for offset in ip_offsets]
                ip_score = min(score for score, _, _ in seen)
                blocked_until = min(until for _, until, _ in seen)
                was_blocked = not reservation.set_until
            else:
                added = [self._add(offset, ip_owner, now, s.ip_half_life) for offset in ip_offsets]
                ip_score = min(score for score, _ in added)
                blocked_until = min(until for _, until in added)
                was_blocked = blocked_until > now
                if ip_score >= s.ip_max_failures - _BLOCK_SLACK:
                    for offset in ip_offsets:
                        self._block(offset, now + s.block_seconds)
                    blocked_until = max(blocked_until, now + s.block_seconds)
            account_score = 0.0
            if account_slots is not None:
                owner, offsets = account_slots
                account_score = min(
                    self._add(offset, owner, now, s.account_half_life)[0] for offset in offsets
                )
        return _verdict(s, ip_score, account_score, blocked_until, was_blocked, now)

    def success(self, ip: str, account: str, now: float,
                reservation: Reservation | None = None) -> None:
        if reservation is not None:
            self.release(ip, reservation, now)
        name = account_key(account)
        if not name:
            return
        owner, offsets = self._locate(name, 1)
        with self._lock:
            for offset in offsets:
                score, _, slot_owner = self._read(offset, now, self.settings.account_half_life)
                if score == 0.0 or slot_owner == owner:
                    _SLOT.pack_into(self._map, offset, 0.0, now, 0.0, _MIXED)
