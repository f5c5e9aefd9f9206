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

How the transport uses it (SMTP AUTH now, POP3 and IMAP later), with ``now = time.monotonic()``:

1. Before looking at the credentials, ``throttle.check(ip, now)``. If ``not verdict.allowed``,
   answer ``421 4.7.0`` and close, *whatever the password*: checking it first would let a blocked
   client keep guessing and learn the right password from the answer.
2. Wrong password: ``verdict = throttle.failure(ip, account, now)`` first, then
   ``await asyncio.sleep(verdict.delay)``, then the failure reply (``535 5.7.8``, RFC 4954 6).
   Recording before sleeping matters: a client that hangs up during the delay to try again on a
   fresh connection has still been counted. If ``verdict.blocked``, send ``421 4.7.0`` at once
   and close instead (``delay`` is then 0: nothing is gained by holding a connection we are about
   to drop).
3. Right password: ``throttle.success(ip, account, now)``, and answer ``235`` at once.

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


class AuthThrottle(Protocol):
    """Counts authentication failures; ``now`` is ``time.monotonic()`` in every process."""

    def check(self, ip: str, now: float) -> Verdict:
        """May the client at *ip* try to authenticate now? Ask before checking credentials."""

    def failure(self, ip: str, account: str, now: float) -> Verdict:
        """Record one failed authentication by *ip* for *account* (``""`` when no account name was
        given or it could not be parsed: then only the address counts)."""

    def success(self, ip: str, account: str, now: float) -> None:
        """Record a successful authentication: clears the account's count, not the address's."""


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
    """The key *account* is counted under: trimmed and lower case, so ``Alice@Example.ORG`` and
    ``alice@example.org`` share one count. Merging two names can only make a count stricter."""
    return account.strip().lower()


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

    def failure(self, ip: str, account: str, now: float) -> Verdict:
        s = self.settings
        ikey = _digest(ip_key(ip))
        name = account_key(account)
        with self._lock:
            cell = self._touch(self._ips, ikey, now, s.ip_half_life)
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

    def success(self, ip: str, account: str, now: float) -> None:
        name = account_key(account)
        if name:
            with self._lock:
                self._accounts.pop(_digest(name), None)


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

    def failure(self, ip: str, account: str, now: float) -> Verdict:
        s = self.settings
        ip_owner, ip_offsets = self._locate(ip_key(ip), 0)
        name = account_key(account)
        account_slots = self._locate(name, 1) if name else None
        with self._lock:
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

    def success(self, ip: str, account: str, now: float) -> None:
        name = account_key(account)
        if not name:
            return
        owner, offsets = self._locate(name, 1)
        with self._lock:
            for offset in offsets:
                score, _, slot_owner = self._read(offset, now, self.settings.account_half_life)
                if score == 0.0 or slot_owner == owner:
                    _SLOT.pack_into(self._map, offset, 0.0, now, 0.0, _MIXED)
