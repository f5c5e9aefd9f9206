"""Brute-force protection for authentication (policy/authlimit.py).

Every call gets the time explicitly, so nothing here sleeps. The behaviour tests run against both
implementations; SharedThrottle also gets real forked processes and tables small enough to force
collisions.
"""

from __future__ import annotations

import multiprocessing
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.policy.authlimit import (
    AuthThrottle,
    LocalThrottle,
    SharedThrottle,
    ThrottleSettings,
    Verdict,
    account_key,
    ip_key,
)

DEFAULTS = ThrottleSettings()
Factory = Callable[[ThrottleSettings], AuthThrottle]


def _local(s: ThrottleSettings) -> AuthThrottle:
    return LocalThrottle(s)


def _shared(s: ThrottleSettings) -> AuthThrottle:
    return SharedThrottle(s, slots=4096)


@pytest.fixture(params=[_local, _shared], ids=["local", "shared"])
def make(request: pytest.FixtureRequest) -> Factory:
    factory: Factory = request.param
    return factory


def fail_many(t: AuthThrottle, ip: str, account: str, n: int, now: float) -> list[Verdict]:
    return [t.failure(ip, account, now) for _ in range(n)]


# --- delays ---------------------------------------------------------------------------------


def test_free_failures_are_not_delayed(make: Factory) -> None:
    t = make(DEFAULTS)
    verdicts = fail_many(t, "192.0.2.1", "alice@example.org", 3, now=10.0)
    assert [v.delay for v in verdicts] == [0.0, 0.0, 0.0]
    assert not any(v.blocked for v in verdicts)
    assert t.failure("192.0.2.1", "alice@example.org", 10.0).delay == 1.0


def test_ip_delays_grow_cap_then_block(make: Factory) -> None:
    t = make(DEFAULTS)
    verdicts = fail_many(t, "192.0.2.1", "", 10, now=0.0)
    assert [v.delay for v in verdicts[:9]] == [0, 0, 0, 1, 2, 4, 8, 15, 15]
    assert not any(v.blocked for v in verdicts[:9])
    assert verdicts[9].blocked and verdicts[9].delay == 0.0


def test_account_delays_grow_and_cap_across_addresses_and_never_block(make: Factory) -> None:
    t = make(DEFAULTS)
    verdicts = [t.failure(f"198.51.100.{i}", "alice@example.org", 0.0) for i in range(1, 41)]
    assert [v.delay for v in verdicts[:10]] == [0, 0, 0, 0, 0, 1, 2, 4, 8, 15]
    assert all(v.delay == 15.0 for v in verdicts[10:])
    assert not any(v.blocked for v in verdicts)
    assert verdicts[-1].account_failures == 40.0
    assert t.check("198.51.100.200", 0.0).allowed


def test_delay_is_the_larger_of_address_and_account(make: Factory) -> None:
    t = make(DEFAULTS)
    fail_many(t, "203.0.113.9", "bob@example.org", 6, now=0.0)  # ip 6 -> 4 s, account 6 -> 1 s
    v = t.failure("203.0.113.9", "carol@example.org", 0.0)  # ip 7 -> 8 s, account 1 -> 0
    assert v.delay == 8.0
    v = t.failure("203.0.113.10", "bob@example.org", 0.0)  # ip 1 -> 0, account 7 -> 2 s
    assert v.delay == 2.0


# --- the block ------------------------------------------------------------------------------


def test_block_engages_at_threshold_lasts_block_seconds_then_clears(make: Factory) -> None:
    s = ThrottleSettings(block_seconds=300.0)
    t = make(s)
    verdicts = fail_many(t, "192.0.2.7", "", 10, now=1000.0)
    assert not verdicts[8].blocked
    assert verdicts[9].blocked and verdicts[9].just_blocked
    assert verdicts[9].blocked_for == 300.0
    assert verdicts[9].ip_failures == 10.0

    during = t.check("192.0.2.7", 1299.5)
    assert not during.allowed and during.blocked_for == pytest.approx(0.5)
    # a failure that races the block (another worker was mid-AUTH) is counted, not logged again
    late = t.failure("192.0.2.7", "", 1200.0)
    assert late.blocked and not late.just_blocked and late.blocked_for == 100.0

    assert not t.check("192.0.2.7", 1299.9).allowed
    after = t.check("192.0.2.7", 1300.0)
    assert after.allowed and after.blocked_for == 0.0
    # the count was not reset by the block's end: it decays like any other
    assert after.ip_failures == pytest.approx(10 * 0.5 ** (300 / 600) + 0.5 ** (100 / 600))


def test_failures_while_blocked_extend_the_block(make: Factory) -> None:
    t = make(DEFAULTS)
    fail_many(t, "192.0.2.9", "", 10, now=0.0)
    assert t.failure("192.0.2.9", "", 60.0).blocked_for == 600.0  # still >= 10: now until 660
    assert not t.check("192.0.2.9", 659.0).allowed
    assert t.check("192.0.2.9", 660.0).allowed


def test_count_survives_the_block_so_a_repeat_offender_is_blocked_sooner(make: Factory) -> None:
    t = make(DEFAULTS)
    fail_many(t, "192.0.2.8", "", 10, now=0.0)
    assert t.check("192.0.2.8", 600.0).ip_failures == pytest.approx(5.0)
    again = fail_many(t, "192.0.2.8", "", 5, now=600.0)
    assert [v.blocked for v in again] == [False, False, False, False, True]


def test_thirty_wrong_passwords_block_one_address_not_the_user(make: Factory) -> None:
    t = make(DEFAULTS)
    attacker, user, other = "203.0.113.66", "192.0.2.20", "192.0.2.21"
    answered, refused = [], 0
    for _ in range(30):
        if not t.check(attacker, 50.0).allowed:
            refused += 1
            continue
        answered.append(t.failure(attacker, "alice@example.org", 50.0))
    assert len(answered) == 10 and refused == 20
    assert answered[-1].just_blocked

    # A wrong password from a clean address is delayed by the account's count ...
    wrong = t.failure(other, "alice@example.org", 50.0)
    assert not wrong.blocked and wrong.delay == 15.0
    # ... but the right one is let in at once: the check has no delay, success returns nothing.
    ok = t.check(user, 50.0)
    assert ok.allowed and ok.delay == 0.0 and ok.blocked_for == 0.0
    t.success(user, "alice@example.org", 50.0)
    # it cleared the account's count, and left the attacker blocked
    after = t.failure("192.0.2.22", "Alice@Example.org", 51.0)
    assert after.account_failures == 1.0 and after.delay == 0.0
    assert not t.check(attacker, 51.0).allowed


def test_success_clears_the_account_not_the_address(make: Factory) -> None:
    t = make(DEFAULTS)
    fail_many(t, "192.0.2.30", "mallory@example.org", 9, now=0.0)
    t.success("192.0.2.30", "mallory@example.org", 0.0)
    v = t.failure("192.0.2.30", "someone@example.org", 0.0)
    assert v.blocked and v.just_blocked


def test_empty_account_counts_on_the_address_only(make: Factory) -> None:
    t = make(DEFAULTS)
    for _ in range(8):
        v = t.failure("192.0.2.40", "", 0.0)
        assert v.account_failures == 0.0
    assert v.delay == 15.0  # from the address alone
    t.success("192.0.2.40", "", 0.0)  # no account: nothing to clear, no error
    assert t.check("192.0.2.40", 0.0).ip_failures == 8.0


def test_check_is_allowed_and_undelayed_for_unknown_addresses(make: Factory) -> None:
    t = make(DEFAULTS)
    assert t.check("192.0.2.50", 0.0) == Verdict()
    assert Verdict().allowed and not Verdict().blocked


# --- forgetting -----------------------------------------------------------------------------


def test_decay_halves_the_count_every_half_life(make: Factory) -> None:
    t = make(DEFAULTS)
    fail_many(t, "192.0.2.60", "dave@example.org", 8, now=0.0)
    assert t.check("192.0.2.60", 600.0).ip_failures == pytest.approx(4.0)
    assert t.check("192.0.2.60", 1200.0).ip_failures == pytest.approx(2.0)
    assert t.failure("192.0.2.60", "", 1200.0).ip_failures == pytest.approx(3.0)  # free again
    # the account remembers longer (half-life 1800 s): 6.04 is past its 5 free failures
    v = t.failure("192.0.2.63", "dave@example.org", 1200.0)
    assert v.account_failures == pytest.approx(8 * 0.5 ** (1200 / 1800) + 1)
    assert v.delay == 2.0


def test_decay_forgets_old_failures_entirely(make: Factory) -> None:
    t = make(DEFAULTS)
    fail_many(t, "192.0.2.61", "erin@example.org", 9, now=0.0)
    later = 600.0 * 10  # ten half-lives: 9 / 1024 is below the forgetting threshold
    assert t.check("192.0.2.61", later).ip_failures == 0.0
    v = t.failure("192.0.2.61", "erin@example.org", 1800.0 * 10)
    assert v.ip_failures == 1.0 and v.account_failures == 1.0 and v.delay == 0.0


def test_slow_failures_never_block(make: Factory) -> None:
    """A client retrying a stale password every five minutes for a day is never blocked."""
    t = make(DEFAULTS)
    for i in range(288):
        v = t.failure("192.0.2.62", "frank@example.org", i * 300.0)
        assert not v.blocked
    assert v.ip_failures < DEFAULTS.ip_max_failures / 2


# --- keys -----------------------------------------------------------------------------------


def test_ip_key_ipv4_alone_ipv6_per_64() -> None:
    assert ip_key("192.0.2.1") == "192.0.2.1"
    assert ip_key("192.0.2.1") != ip_key("192.0.2.2")
    assert ip_key("2001:db8:1:2::1") == ip_key("2001:DB8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::1") != ip_key("2001:db8:1:2::1")
    assert ip_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert ip_key("[IPv6:2001:db8:1:2::5]") == "2001:db8:1:2::/64"
    assert ip_key("fe80::1%eth0") == "fe80::/64"
    assert ip_key("not an address") == "not an address"


def test_account_key_normalises_case_and_blanks() -> None:
    assert account_key("  Alice@Example.ORG ") == "alice@example.org"
    assert account_key("") == ""


def test_ipv6_addresses_of_one_64_share_a_count(make: Factory) -> None:
    t = make(DEFAULTS)
    verdicts = [t.failure(f"2001:db8:1:2::{i:x}", "", 0.0) for i in range(1, 11)]
    assert verdicts[-1].just_blocked
    assert not t.check("2001:db8:1:2:abcd::1", 0.0).allowed
    assert t.check("2001:db8:1:3::1", 0.0).allowed
    assert t.check("::ffff:192.0.2.1", 0.0).allowed


def test_ipv4_mapped_counts_as_ipv4(make: Factory) -> None:
    t = make(DEFAULTS)
    fail_many(t, "::ffff:192.0.2.70", "", 10, now=0.0)
    assert not t.check("192.0.2.70", 0.0).allowed
    assert t.check("192.0.2.71", 0.0).allowed


def test_account_names_differing_in_case_share_a_count(make: Factory) -> None:
    t = make(DEFAULTS)
    t.failure("192.0.2.80", "Grace@Example.org", 0.0)
    v = t.failure("192.0.2.81", "grace@example.ORG", 0.0)
    assert v.account_failures == 2.0


def test_account_key_is_the_stores_lookup_key() -> None:
    """Issue 3 review: ``alice@example.com.`` logs in as alice and must count as alice."""
    for spelling in ("alice@example.com.", "ALICE@EXAMPLE.COM", " Alice@Example.com. ",
                     "alice@EXAMPLE.com"):
        assert account_key(spelling) == "alice@example.com"
    assert account_key("bob@xn--bcher-kva.example") == account_key("Bob@Bücher.example.")
    assert account_key("Straße@example.com") == account_key("STRASSE@example.com")
    assert account_key("just-a-name") == "just-a-name"
    long = "a@xn--" + "b" * 9000  # no parsing of what cannot be an address
    assert account_key(long) == long


def test_spellings_of_one_account_share_its_count(make: Factory) -> None:
    t = make(DEFAULTS)
    t.failure("192.0.2.82", "grace@example.org", 0.0)
    t.failure("192.0.2.83", "grace@example.org.", 0.0)
    v = t.failure("192.0.2.84", "GRACE@xn--exmple-cua.org", 0.0)  # another domain: own count
    assert v.account_failures == 1.0
    assert t.failure("192.0.2.85", "Grace@Example.ORG", 0.0).account_failures == 3.0
    t.success("192.0.2.86", "grace@example.org.", 0.0)  # a success by any spelling clears it
    assert t.failure("192.0.2.87", "grace@example.org", 0.0).account_failures == 1.0


# --- reservations ---------------------------------------------------------------------------


def test_reservations_count_in_flight_attempts(make: Factory) -> None:
    """Issue 3 review: thirty parallel guesses all passed the block test before the first was
    recorded. Reserved before the check, exactly ip_max_failures are let through."""
    t = make(DEFAULTS)
    ip = "203.0.113.40"
    reservations = [t.reserve(ip, 5.0) for _ in range(30)]
    granted = [r for r in reservations if r.granted]
    assert len(granted) == 10
    assert [r.set_until > 0 for r in granted] == [False] * 9 + [True]  # the tenth blocks ...
    assert granted[-1].blocked_for == 600.0
    assert all(r.blocked_for == pytest.approx(600.0) for r in reservations[10:])
    assert not t.check(ip, 5.0).allowed  # ... and everyone else is refused meanwhile
    verdicts = [t.failure(ip, "alice@example.org", 5.0, r) for r in granted]
    # the address was counted once per attempt, not twice; the block line is logged once
    assert verdicts[-1].ip_failures == 10.0 and verdicts[-1].account_failures == 10.0
    assert [v.just_blocked for v in verdicts] == [False] * 9 + [True]
    assert all(v.blocked for v in verdicts)  # the tenth's block holds for the ones in flight
    assert t.check(ip, 5.0).ip_failures == 10.0


def test_a_refused_reservation_counts_nothing(make: Factory) -> None:
    t = make(DEFAULTS)
    ip = "203.0.113.41"
    fail_many(t, ip, "", 10, now=0.0)
    refused = t.reserve(ip, 100.0)
    assert not refused.granted and refused.blocked_for == 500.0
    t.release(ip, refused, 100.0)  # a no-op
    assert t.check(ip, 100.0).ip_failures == pytest.approx(10 * 0.5 ** (100 / 600))
    assert t.check(ip, 100.0).blocked_for == 500.0  # not extended


def test_success_gives_the_reservation_and_its_block_back(make: Factory) -> None:
    """Nine failures, then the right password: its reservation reached the limit and set the
    block, but a success is no failure: the count and the block are as they were."""
    t = make(DEFAULTS)
    ip = "192.0.2.42"
    fail_many(t, ip, "bob@example.org", 9, now=0.0)
    r = t.reserve(ip, 1.0)
    assert r.granted and r.set_until == 601.0
    assert not t.check(ip, 1.0).allowed
    t.success(ip, "bob@example.org", 2.0, r)
    after = t.check(ip, 2.0)
    assert after.allowed and after.ip_failures == pytest.approx(9 * 0.5 ** (2 / 600))
    # the reservation's 1, decayed since it was taken, is what was given back: no residue
    assert t.failure(ip, "", 2.0).just_blocked


def test_release_keeps_a_block_renewed_since(make: Factory) -> None:
    t = make(DEFAULTS)
    ip = "192.0.2.43"
    fail_many(t, ip, "", 9, now=0.0)
    mine = t.reserve(ip, 0.0)  # sets the block until 600
    assert mine.set_until == 600.0
    t.failure(ip, "", 10.0)  # an unreserved failure (another protocol) renews it: until 610
    t.release(ip, mine, 10.0)
    v = t.check(ip, 10.0)
    assert v.blocked and v.blocked_for == pytest.approx(600.0)


def test_released_challenges_leave_no_trace(make: Factory) -> None:
    """Every step of an exchange is reserved; a challenge gives it back at once."""
    t = make(DEFAULTS)
    ip = "192.0.2.44"
    fail_many(t, ip, "", 9, now=0.0)
    for _ in range(50):
        t.release(ip, t.reserve(ip, 0.0), 0.0)
    v = t.check(ip, 0.0)
    assert v.allowed and v.ip_failures == pytest.approx(9.0)


def test_shared_release_keeps_a_colliding_keys_block() -> None:
    """Our reservation blocks both our slots; one of them also holds another key's shorter,
    still running block. Releasing must lift only what we wrote there and put back the other
    key's block, not zero the slot (the other key counts by the smaller of its two slots, so a
    zeroed slot would free it)."""
    t = SharedThrottle(ThrottleSettings(block_seconds=1000.0), slots=8)
    x = "203.0.113.1"
    x_slots = set(t._locate(ip_key(x), 0)[1])
    # a key that shares exactly one slot with x (found by its fingerprints, salt is random)
    y = next(ip for ip in (f"10.9.{i // 256}.{i % 256}" for i in range(5000))
             if len(set(t._locate(ip_key(ip), 0)[1]) & x_slots) == 1
             and len(t._locate(ip_key(ip), 0)[1]) == 2)
    fail_many(t, x, "", 10, now=0.0)  # x blocked until 1000
    assert t.check(y, 0.0).allowed  # y's other slot is cold
    for _ in range(9):  # the cold slot decides: nine in flight, the tenth blocks
        assert t.reserve(y, 500.0).granted
    r = t.reserve(y, 500.0)
    assert r.granted and r.set_until == 1500.0  # both of y's slots now read 1500
    t.release(y, r, 500.0)
    assert not t.check(x, 500.0).allowed  # x keeps its block, until 1000 ...
    assert t.check(x, 500.0).blocked_for == pytest.approx(500.0)
    assert t.check(y, 500.0).allowed  # ... and y has none


def test_shared_reservation_taken_in_a_child_is_settled_in_the_parent() -> None:
    t = SharedThrottle(DEFAULTS, slots=1024)
    ip = "192.0.2.93"
    for _ in range(9):
        t.failure(ip, "", 0.0)
    taken = FORK.Queue()

    def child() -> None:
        taken.put(t.reserve(ip, 0.0))

    _run_in_children([child])
    r = taken.get(timeout=10)
    assert r.granted and not t.check(ip, 0.0).allowed  # the child's reservation blocks us too
    t.release(ip, r, 0.0)
    assert t.check(ip, 0.0).allowed


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"ip_max_failures": 3},
        {"ip_free_failures": -1},
        {"ip_half_life": 0.0},
        {"block_seconds": -5.0},
        {"ip_delay_growth": 0.5},
        {"account_delay_max": float("inf")},
        {"account_delay_max": 301.0},
        {"account_delay_base": float("nan")},
        {"ip_delay_base": 1e-300},
        {"ip_delay_growth": 1000.0},
    ],
)
def test_settings_reject_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ThrottleSettings(**bad)


def test_delay_formula_edges() -> None:
    s = ThrottleSettings(ip_delay_growth=1.0, ip_delay_base=2.0)
    assert [s.ip_delay(n) for n in (3, 4, 9)] == [0.0, 2.0, 2.0]
    s = ThrottleSettings(ip_delay_base=0.0)
    assert s.ip_delay(9) == 0.0
    assert DEFAULTS.ip_delay(10.0**6) == 15.0  # no overflow for absurd counts
    assert DEFAULTS.ip_delay(3.2) == 1.0  # a partly decayed count rounds up to the next step


# --- LocalThrottle: bounded memory ----------------------------------------------------------


def test_local_throttle_is_bounded_and_evicts_the_oldest() -> None:
    t = LocalThrottle(DEFAULTS, max_entries=100)
    t.failure("192.0.2.1", "first@example.org", 0.0)
    for i in range(1000):
        t.failure(f"10.0.{i // 256}.{i % 256}", f"user{i}@example.org", 1.0)
    assert t.entries == (100, 100)
    assert t.check("192.0.2.1", 1.0).ip_failures == 0.0  # evicted: the oldest
    assert t.check("10.0.3.231", 1.0).ip_failures == 1.0  # the newest is kept


def test_local_throttle_memory_does_not_grow_under_a_spray() -> None:
    long_name = "x" * 10_000  # a user name's length costs nothing: keys are stored as digests

    def spray(t: LocalThrottle, prefix: int) -> None:
        for i in range(2000):
            t.failure(f"2001:db8:{prefix:x}:{i:x}::1", f"{long_name}{prefix}.{i}", 0.0)
            t.check(f"2001:db8:ffff:{i:x}::1", 0.0)  # lookups of unknown clients store nothing

    tracemalloc.start()
    try:
        t = LocalThrottle(DEFAULTS, max_entries=500)
        spray(t, 1)
        first, _ = tracemalloc.get_traced_memory()
        for round_ in range(2, 5):
            spray(t, round_)
        last, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert t.entries == (500, 500)
    assert first < 1000 * 600, first  # two tables of 500 keys, a few hundred bytes a key
    assert last - first < 32 * 1024, (first, last)  # 6,000 more keys, no more memory


# --- SharedThrottle: shared across processes, collisions only stricter -----------------------

FORK = multiprocessing.get_context("fork")


def _run_in_children(targets: list[Callable[[], None]]) -> None:
    procs = [FORK.Process(target=target) for target in targets]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(20)
        assert proc.exitcode == 0


def test_shared_throttle_is_seen_by_a_forked_child_and_back() -> None:
    t = SharedThrottle(DEFAULTS, slots=1024)
    t.failure("192.0.2.90", "", 0.0)  # before the fork

    def child() -> None:
        assert t.check("192.0.2.90", 0.0).ip_failures == 1.0
        for _ in range(9):
            t.failure("192.0.2.90", "heidi@example.org", 0.0)

    _run_in_children([child])
    seen = t.check("192.0.2.90", 1.0)
    assert seen.blocked and seen.blocked_for == pytest.approx(599.0)
    assert t.failure("198.51.100.1", "heidi@example.org", 0.0).account_failures == 10.0


def test_shared_throttle_loses_no_update_under_concurrent_workers() -> None:
    s = ThrottleSettings(ip_max_failures=100_000)
    t = SharedThrottle(s, slots=1024)

    def worker() -> None:
        for _ in range(500):
            t.failure("192.0.2.91", "ivan@example.org", 0.0)

    _run_in_children([worker, worker, worker])
    assert t.check("192.0.2.91", 0.0).ip_failures == 1500.0
    assert t.failure("192.0.2.92", "ivan@example.org", 0.0).account_failures == 1501.0


def test_shared_collisions_make_limits_stricter_not_looser() -> None:
    t = SharedThrottle(DEFAULTS, slots=1)  # every key collides with every other
    fail_many(t, "203.0.113.1", "", 10, now=0.0)
    assert not t.check("192.0.2.1", 0.0).allowed  # stricter: an innocent neighbour is blocked too

    # Two accounts in one slot: success of one must not wipe the other's failures.
    fail_many(t, "198.51.100.1", "judy@example.org", 4, now=0.0)
    fail_many(t, "198.51.100.2", "ken@example.org", 4, now=0.0)
    t.success("198.51.100.3", "judy@example.org", 0.0)
    assert t.failure("198.51.100.4", "ken@example.org", 0.0).account_failures == 9.0


def test_shared_success_clears_a_slot_it_owns_alone() -> None:
    t = SharedThrottle(DEFAULTS, slots=1)
    fail_many(t, "198.51.100.1", "judy@example.org", 7, now=0.0)
    t.success("198.51.100.1", "Judy@example.org", 0.0)
    assert t.failure("198.51.100.5", "ken@example.org", 0.0).account_failures == 1.0


def test_shared_slot_becomes_free_again_once_decayed() -> None:
    t = SharedThrottle(DEFAULTS, slots=1)
    t.failure("198.51.100.1", "judy@example.org", 0.0)
    t.failure("198.51.100.1", "ken@example.org", 0.0)  # mixed now
    later = 1800.0 * 12  # judy's and ken's failures forgotten
    t.failure("198.51.100.1", "ken@example.org", later)  # ken owns the slot again
    t.success("198.51.100.1", "ken@example.org", later)
    assert t.failure("198.51.100.1", "judy@example.org", later).account_failures == 1.0


def test_shared_innocent_address_is_blocked_only_if_both_its_slots_are_hot() -> None:
    """Each key lives in two slots and counts as the smaller: with 3 blocked attackers in a table
    of 64 slots, an innocent address shares their block with odds of about (6/64)**2 = 1 %, not
    the 18 % that one slot per key would give."""
    t = SharedThrottle(DEFAULTS, slots=64)
    for attacker in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
        fail_many(t, attacker, "", 10, now=0.0)
        assert not t.check(attacker, 0.0).allowed
    innocent = [f"10.1.{i // 256}.{i % 256}" for i in range(400)]
    wrongly_blocked = sum(not t.check(ip, 0.0).allowed for ip in innocent)
    assert wrongly_blocked < 30, wrongly_blocked  # expected about 4; with one slot per key, 70
    # and one typo of an innocent address is blocked on the spot as rarely (about 1 in 100)
    blocked_by_a_typo = sum(t.failure(ip, "", 0.0).blocked for ip in innocent[:100])
    assert blocked_by_a_typo < 8, blocked_by_a_typo


# --- properties -----------------------------------------------------------------------------

KINDS: dict[str, Factory] = {
    "local": lambda s: LocalThrottle(s, max_entries=8),
    "shared": lambda s: SharedThrottle(s, slots=8),
}

ops = st.lists(
    st.tuples(
        st.sampled_from(["failure", "failure", "failure", "check", "success"]),
        st.one_of(st.just(0.0), st.floats(0.0, 30.0), st.floats(0.0, 3000.0)),  # time step
        st.integers(0, 4),  # which address
        st.integers(0, 4),  # which account (0: none)
    ),
    min_size=1,
    max_size=150,
)

settings_st = st.builds(
    ThrottleSettings,
    ip_free_failures=st.integers(0, 6),
    ip_max_failures=st.integers(7, 20),
    ip_half_life=st.floats(1.0, 3600.0),
    block_seconds=st.floats(1.0, 3600.0),
    ip_delay_base=st.one_of(st.just(0.0), st.floats(0.001, 5.0)),
    ip_delay_growth=st.floats(1.0, 100.0),
    ip_delay_max=st.floats(0.0, 300.0),
    account_free_failures=st.integers(0, 10),
    account_half_life=st.floats(1.0, 3600.0),
    account_delay_base=st.one_of(st.just(0.0), st.floats(0.001, 5.0)),
    account_delay_growth=st.floats(1.0, 100.0),
    account_delay_max=st.floats(0.0, 300.0),
)


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), s=settings_st, script=ops)
def test_property_delay_never_exceeds_the_cap(
    kind: str, s: ThrottleSettings, script: list[tuple[str, float, int, int]]
) -> None:
    t = KINDS[kind](s)
    cap = max(s.ip_delay_max, s.account_delay_max)
    now = 0.0
    for op, step, ip_n, account_n in script:
        now += step
        ip, account = f"192.0.2.{ip_n}", f"user{account_n}" if account_n else ""
        if op == "success":
            t.success(ip, account, now)
            continue
        v = t.check(ip, now) if op == "check" else t.failure(ip, account, now)
        assert 0.0 <= v.delay <= cap
        assert 0.0 <= v.blocked_for <= s.block_seconds
        assert not (v.blocked and v.delay)


def _severity(v: Verdict) -> tuple[float, float]:
    return (v.blocked_for, float("inf") if v.blocked else v.delay)


# Whole seconds over a few half-lives, so that histories often reach the block and decay matters.
times = st.lists(st.integers(min_value=0, max_value=900).map(float), max_size=30)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), base=times, extra=times, probe=st.floats(0.0, 1000.0))
def test_property_more_failures_never_give_a_milder_verdict(
    kind: str, base: list[float], extra: list[float], probe: float
) -> None:
    """History B holds every failure of history A and more. At every moment B's verdicts are at
    least as severe as A's: decay forgets both alike, so extra failures can only add."""
    s = ThrottleSettings(ip_half_life=300.0, account_half_life=500.0, block_seconds=200.0)
    a, b = KINDS[kind](s), KINDS[kind](s)
    ip, account = "192.0.2.1", "victim@example.org"
    timeline = sorted([(when, False) for when in base] + [(when, True) for when in extra])
    for when, extra_only in timeline:
        b.failure(ip, account, when)
        if not extra_only:
            a.failure(ip, account, when)
        ca, cb = a.check(ip, when), b.check(ip, when)
        assert cb.ip_failures >= ca.ip_failures - 1e-9
        assert cb.blocked_for >= ca.blocked_for
    end = max(base + extra, default=0.0) + probe
    ca, cb = a.check(ip, end), b.check(ip, end)
    assert cb.ip_failures >= ca.ip_failures - 1e-9
    assert cb.blocked_for >= ca.blocked_for
    fa, fb = a.failure(ip, account, end), b.failure(ip, account, end)
    assert fb.account_failures >= fa.account_failures - 1e-9
    assert _severity(fb) >= _severity(fa)


@settings(max_examples=100, deadline=None)
@given(s=settings_st, script=ops)
def test_property_shared_agrees_with_local_when_nothing_collides(
    s: ThrottleSettings, script: list[tuple[str, float, int, int]]
) -> None:
    local, shared = LocalThrottle(s), SharedThrottle(s, slots=1 << 20)  # 9 keys: no collision
    now = 0.0
    for op, step, ip_n, account_n in script:
        now += step
        ip, account = f"192.0.2.{ip_n}", f"user{account_n}" if account_n else ""
        if op == "success":
            local.success(ip, account, now)
            shared.success(ip, account, now)
        elif op == "check":
            assert local.check(ip, now) == shared.check(ip, now)
        else:
            assert local.failure(ip, account, now) == shared.failure(ip, account, now)


attempts = st.lists(
    st.tuples(
        st.sampled_from(["wrong", "wrong", "wrong", "right", "challenge"]),
        st.one_of(st.just(0.0), st.floats(0.0, 30.0), st.floats(0.0, 3000.0)),  # time step
        st.integers(0, 3),  # which address
        st.integers(0, 3),  # which account (0: none given)
    ),
    min_size=1,
    max_size=120,
)


def _same(a: Verdict, b: Verdict) -> None:
    assert a.blocked_for == pytest.approx(b.blocked_for)
    assert a.delay == pytest.approx(b.delay)
    assert a.just_blocked == b.just_blocked
    assert a.ip_failures == pytest.approx(b.ip_failures, abs=1e-6)
    assert a.account_failures == pytest.approx(b.account_failures, abs=1e-6)


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), s=settings_st, script=attempts)
def test_property_reservations_one_at_a_time_change_nothing(
    kind: str, s: ThrottleSettings, script: list[tuple[str, float, int, int]]
) -> None:
    """Attempts that do not overlap get the same answers whether the throttle is asked with
    check() and failure(), or with reserve() and a settling call: reservations only matter for
    attempts in flight together."""
    plain = KINDS[kind](s) if kind == "local" else SharedThrottle(s, slots=1 << 20)
    reserving = KINDS[kind](s) if kind == "local" else SharedThrottle(s, slots=1 << 20)
    now = 0.0
    for op, step, ip_n, account_n in script:
        now += step
        ip, account = f"192.0.2.{ip_n}", f"user{account_n}@example.org" if account_n else ""
        allowed = plain.check(ip, now)
        r = reserving.reserve(ip, now)
        assert r.granted == allowed.allowed
        if not r.granted:
            assert r.blocked_for == pytest.approx(allowed.blocked_for)
            continue
        if op == "wrong":
            _same(plain.failure(ip, account, now), reserving.failure(ip, account, now, r))
        elif op == "right":
            plain.success(ip, account, now)
            reserving.success(ip, account, now, r)
        else:
            reserving.release(ip, r, now)
        _same(plain.check(ip, now), reserving.check(ip, now))
