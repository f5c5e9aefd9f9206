"""The router against a real accounts store: users, aliases, subaddresses, catch-all, postmaster,
quotas, relay control and the old tricks that must never open a relay. Also ``may_relay``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.accounts.store import AccountStore
from postroom.config import DeliverySection, RelaySection
from postroom.message.address import Address
from postroom.policy.relay import may_relay
from postroom.policy.router import Router, format_address
from postroom.policy.routes import Destination, LocalDelivery, Rejected, RemoteDelivery

HASH = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$6Kb0jT4pNOz2J5m4Yx1T8w"


def maildir_usage(maildir: Path, quota: int = 0, incoming: int = 0) -> int:
    """Octets in a Maildir's cur/ and new/: what a quota counts (the router's rules, not how
    the server finds the figure: that is test_quota.py)."""
    total = 0
    for sub in ("cur", "new"):
        folder = maildir / sub
        if folder.is_dir():
            total += sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return total


def fill(maildir: Path, octets: int) -> None:
    (maildir / "cur" / "filler").write_bytes(b"x" * octets)


class Env:
    def __init__(self, root: Path, delivery: DeliverySection | None = None) -> None:
        self.root = root
        self.store = AccountStore(root / "accounts.db", root / "mail")
        self.router = Router(self.store, delivery or DeliverySection(), maildir_usage, root)
        self.store.add_domain("example.com")
        self.store.add_domain("example.org")

    def user(self, address: str, quota: int = 0) -> LocalDelivery:
        u = self.store.add_user(address, HASH, quota)
        return LocalDelivery(u.address, u.maildir, u.quota)

    def resolve(
        self, local: str, domain: str, *, relay: bool = False
    ) -> list[Destination] | Rejected:
        return self.router.resolve(Address(local, domain), may_relay=relay)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.store.close()


def unknown(shown: str) -> Rejected:
    return Rejected(
        550,
        "5.1.1",
        f"<{shown}>: Recipient address rejected: User unknown in virtual mailbox table",
    )


def denied(shown: str) -> Rejected:
    return Rejected(554, "5.7.1", f"<{shown}>: Relay access denied")


def loop(shown: str) -> Rejected:
    return Rejected(554, "5.4.6", f"<{shown}>: Recipient address rejected: alias expansion loop")


# --- users --------------------------------------------------------------------------------------


def test_exact_user(env: Env) -> None:
    alice = env.user("alice@example.com")
    assert env.resolve("alice", "example.com") == [alice]
    assert env.resolve("ALICE", "EXAMPLE.COM") == [alice]  # Postfix folds case


def test_unknown_user(env: Env) -> None:
    assert env.resolve("nobody", "example.com") == unknown("nobody@example.com")
    # Even a client that may relay cannot reach a missing user in a local domain.
    assert env.resolve("nobody", "example.com", relay=True) == unknown("nobody@example.com")


def test_new_user_is_seen_at_once(env: Env) -> None:
    assert isinstance(env.resolve("late", "example.com"), Rejected)
    late = env.user("late@example.com")
    assert env.resolve("late", "example.com") == [late]


def test_null_address_and_bare_local_part(env: Env) -> None:
    assert env.resolve("", "") == Rejected(
        501, "5.1.3", "<>: Recipient address rejected: Bad address syntax"
    )
    env.user("alice@example.com")
    assert env.resolve("alice", "") == Rejected(
        501, "5.1.3", "<alice>: Recipient address rejected: Bad address syntax"
    )


def test_idn_domain_in_a_label_form(env: Env) -> None:
    env.store.add_domain("bücher.example")
    user = env.user("anna@bücher.example")
    assert env.resolve("anna", "xn--bcher-kva.example") == [user]
    assert env.resolve("anna", "bücher.example") == [user]


# --- aliases ------------------------------------------------------------------------------------


def test_alias_to_local_and_remote(env: Env) -> None:
    alice = env.user("alice@example.com")
    env.store.add_alias("team@example.com", "alice@example.com")
    env.store.add_alias("team@example.com", "friend@elsewhere.net")
    # The remote member is the administrator's choice: no relay permission is needed.
    assert env.resolve("Team", "example.com") == [alice, RemoteDelivery("friend@elsewhere.net")]


def test_nested_aliases_are_deduplicated(env: Env) -> None:
    alice = env.user("alice@example.com")
    bob = env.user("bob@example.org")
    env.store.add_alias("all@example.com", "left@example.com")
    env.store.add_alias("all@example.com", "right@example.com")
    env.store.add_alias("left@example.com", "alice@example.com")
    env.store.add_alias("left@example.com", "bob@example.org")
    env.store.add_alias("right@example.com", "ALICE@example.com")  # diamond: not a loop
    env.store.add_alias("right@example.com", "x@elsewhere.net")
    env.store.add_alias("left@example.com", "x@ELSEWHERE.net")
    assert env.resolve("all", "example.com") == [alice, bob, RemoteDelivery("x@elsewhere.net")]


class CountingStore(AccountStore):
    """The real store, counting alias lookups."""

    lookups = 0

    def alias_targets(self, source: str) -> list[str]:
        self.lookups += 1
        return super().alias_targets(source)


def test_cycle_is_detected_not_just_depth_limited(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "accounts.db", tmp_path / "mail")
    router = Router(store, DeliverySection(alias_max_depth=10_000), maildir_usage, tmp_path)
    store.add_domain("example.com")
    store.add_alias("a@example.com", "b@example.com")
    store.add_alias("b@example.com", "A@example.com")
    assert router.resolve(Address("a", "example.com"), may_relay=False) == loop("a@example.com")
    assert store.lookups <= 4  # a, b, a again: found at once, not after 10,000 rounds
    store.add_alias("self@example.com", "self@example.com")
    assert router.resolve(Address("self", "example.com"), may_relay=True) == loop(
        "self@example.com"
    )
    store.close()


def test_loop_through_catch_all(env: Env) -> None:
    env.store.add_alias("@example.com", "missing@example.com")
    assert env.resolve("anything", "example.com") == loop("anything@example.com")


def test_depth_limit(tmp_path: Path) -> None:
    e = Env(tmp_path, DeliverySection(alias_max_depth=3))
    alice = e.user("alice@example.com")
    chain = ["a1", "a2", "a3", "a4"]
    for source, target in itertools.pairwise(chain):
        e.store.add_alias(f"{source}@example.com", f"{target}@example.com")
    e.store.add_alias("a4@example.com", "alice@example.com")
    assert e.resolve("a2", "example.com") == [alice]  # a2 -> a3 -> a4: three levels
    assert e.resolve("a1", "example.com") == loop("a1@example.com")  # four
    e.store.close()


def test_alias_member_that_cannot_take_mail_is_skipped(env: Env) -> None:
    alice = env.user("alice@example.com")
    full = env.user("full@example.com", quota=10)
    fill(full.maildir, 10)
    env.store.add_alias("list@example.com", "ghost@example.com")
    env.store.add_alias("list@example.com", "full@example.com")
    env.store.add_alias("list@example.com", "alice@example.com")
    assert env.resolve("list", "example.com") == [alice]
    env.store.add_alias("only-ghost@example.com", "ghost@example.com")
    assert env.resolve("only-ghost", "example.com") == unknown("only-ghost@example.com")
    env.store.add_alias("only-full@example.com", "full@example.com")
    assert env.resolve("only-full", "example.com") == Rejected(
        552, "5.2.2", "<only-full@example.com>: Recipient address rejected: Mailbox full"
    )


# --- subaddresses -------------------------------------------------------------------------------


def test_subaddress_reaches_base_user(env: Env) -> None:
    alice = env.user("alice@example.com")
    assert env.resolve("alice+news", "example.com") == [alice]
    assert env.resolve("Alice+a+b", "example.com") == [alice]  # split at the first delimiter
    assert env.resolve("+alice", "example.com") == unknown("+alice@example.com")


def test_subaddress_order_exact_then_alias_then_base(env: Env) -> None:
    alice = env.user("alice@example.com")
    special = env.user("alice+special@example.com")
    bob = env.user("bob@example.com")
    env.store.add_alias("alice+list@example.com", "bob@example.com")
    assert env.resolve("alice+special", "example.com") == [special]
    assert env.resolve("alice+list", "example.com") == [bob]
    assert env.resolve("alice+other", "example.com") == [alice]
    env.store.add_alias("team@example.com", "bob@example.com")
    assert env.resolve("team+x", "example.com") == [bob]  # base alias


def test_subaddress_delimiters(tmp_path: Path) -> None:
    e = Env(tmp_path, DeliverySection(recipient_delimiter="-+"))
    alice = e.user("alice@example.com")
    assert e.resolve("alice-x", "example.com") == [alice]
    assert e.resolve("alice+x", "example.com") == [alice]
    e.router.delivery = DeliverySection(recipient_delimiter="")  # as a reload does
    assert e.resolve("alice+x", "example.com") == unknown("alice+x@example.com")
    e.store.close()


# --- catch-all and postmaster -------------------------------------------------------------------


def test_catch_all(env: Env) -> None:
    alice = env.user("alice@example.com")
    bob = env.user("bob@example.com")
    env.store.add_alias("@example.com", "bob@example.com")
    assert env.resolve("anything", "example.com") == [bob]
    assert env.resolve("alice", "example.com") == [alice]  # users come first
    assert env.resolve("anything", "example.org") == unknown("anything@example.org")


def test_postmaster_in_any_local_domain(env: Env) -> None:
    builtin = LocalDelivery("postmaster", env.root / "postmaster")
    assert env.resolve("PostMaster", "example.org") == [builtin]
    for sub in ("cur", "new", "tmp"):
        assert (env.root / "postmaster" / sub).is_dir()
    admin = env.user("admin@example.com")
    env.store.add_alias("postmaster@example.com", "admin@example.com")  # the primary domain
    assert env.resolve("postmaster", "example.org") == [admin]
    assert env.resolve("POSTMASTER", "example.com") == [admin]


def test_bare_postmaster_builtin_then_primary_domain(env: Env) -> None:
    builtin = LocalDelivery("postmaster", env.root / "postmaster")
    assert env.resolve("Postmaster", "") == [builtin]
    pm = env.user("postmaster@example.com")
    assert env.resolve("Postmaster", "") == [pm]


def test_bare_postmaster_configured(tmp_path: Path) -> None:
    e = Env(tmp_path, DeliverySection(postmaster="Boss@example.org"))
    boss = e.user("boss@example.org")
    e.user("postmaster@example.com")
    assert e.resolve("Postmaster", "") == [boss]
    assert e.resolve("postmaster", "example.org") == [boss]
    e.router.delivery = DeliverySection(postmaster="hostmaster@elsewhere.net")
    assert e.resolve("POSTMASTER", "") == [RemoteDelivery("hostmaster@elsewhere.net")]
    e.router.delivery = DeliverySection(postmaster="ghost@example.com")  # resolves to nothing
    assert e.resolve("postmaster", "") == [LocalDelivery("postmaster", tmp_path / "postmaster")]
    e.store.close()


def test_postmaster_alias_loop_falls_back_to_builtin(tmp_path: Path) -> None:
    e = Env(tmp_path, DeliverySection(postmaster="postmaster@example.com"))
    assert e.resolve("postmaster", "") == [LocalDelivery("postmaster", tmp_path / "postmaster")]
    e.store.close()


# --- quotas -------------------------------------------------------------------------------------


def test_quota_at_rcpt(env: Env) -> None:
    carol = env.user("carol@example.com", quota=100)
    fill(carol.maildir, 99)
    assert env.resolve("carol", "example.com") == [carol]
    fill(carol.maildir, 100)
    full = Rejected(
        552, "5.2.2", "<carol+tag@example.com>: Recipient address rejected: Mailbox full"
    )
    assert env.resolve("carol+tag", "example.com") == full
    unlimited = env.user("dave@example.com")
    fill(unlimited.maildir, 10_000)
    assert env.resolve("dave", "example.com") == [unlimited]


def test_check_size(env: Env) -> None:
    carol = env.user("carol@example.com", quota=100)
    fill(carol.maildir, 50)
    assert env.router.check_size(carol, 50) is None
    assert env.router.check_size(carol, 51) == Rejected(
        552, "5.2.2", "<carol@example.com>: Recipient address rejected: Mailbox full"
    )
    assert env.router.check_size(env.user("dave@example.com"), 10**9) is None
    assert env.router.check_size(RemoteDelivery("x@elsewhere.net"), 10**9) is None


# --- relay control ------------------------------------------------------------------------------


def test_remote_domain_needs_relay_permission(env: Env) -> None:
    assert env.resolve("user", "other.com") == denied("user@other.com")
    assert env.resolve("user", "other.com", relay=True) == [RemoteDelivery("user@other.com")]


def test_source_route_is_dropped_so_only_the_mailbox_counts(env: Env) -> None:
    # <@example.com:user@other.com>: the parser drops the route, leaving user@other.com.
    assert env.resolve("user", "other.com") == denied("user@other.com")


@pytest.mark.parametrize(
    ("local", "shown"),
    [
        ("user%other.com", "user%other.com@example.com"),  # the percent hack
        ("other.com!user", "other.com!user@example.com"),  # a bang path
        ("user@other.com", '"user@other.com"@example.com'),  # a quoted @
        ("user%other.com@example.org", '"user%other.com@example.org"@example.com'),
    ],
)
def test_routing_tricks_never_relay(env: Env, local: str, shown: str) -> None:
    env.user("user@example.com")
    for relay in (False, True):
        assert env.resolve(local, "example.com", relay=relay) == unknown(shown)
    # With a catch-all they are delivered where the catch-all points: locally.
    bob = env.user("bob@example.com")
    env.store.add_alias("@example.com", "bob@example.com")
    assert env.resolve(local, "example.com") == [bob]


def test_address_literal_is_not_local(env: Env) -> None:
    env.user("user@example.com")
    assert env.resolve("user", "[127.0.0.1]") == denied("user@[127.0.0.1]")
    assert env.resolve("user", "[127.0.0.1]", relay=True) == [RemoteDelivery("user@[127.0.0.1]")]


@settings(max_examples=60, deadline=None)
@given(
    local=st.text(alphabet=st.sampled_from('abcxyz.%!@+"\\ -_=[]:'), min_size=1, max_size=30),
    relay=st.booleans(),
)
def test_no_local_part_opens_a_relay(
    tmp_path_factory: pytest.TempPathFactory, local: str, relay: bool
) -> None:
    root = tmp_path_factory.mktemp("prop")
    e = Env(root)
    e.user("abc@example.com")
    result = e.resolve(local, "example.com", relay=relay)
    e.store.close()
    if isinstance(result, Rejected):
        assert (result.code, result.enhanced) == (550, "5.1.1")
    else:
        assert all(isinstance(d, LocalDelivery) for d in result)


def test_format_address_quotes_when_needed() -> None:
    assert format_address("a.b+c", "x.org") == "a.b+c@x.org"
    assert format_address("john smith", "x.org") == '"john smith"@x.org'
    assert format_address('a"b\\c', "x.org") == '"a\\"b\\\\c"@x.org'
    assert format_address(".a", "x.org") == '".a"@x.org'
    assert format_address("jürgen", "x.org") == "jürgen@x.org"


# --- may_relay ----------------------------------------------------------------------------------


def test_may_relay_default_denies_everyone() -> None:
    relay = RelaySection()
    for ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "192.0.2.1"):
        assert not may_relay(ip, relay)


def test_may_relay_trusted_networks() -> None:
    relay = RelaySection(trusted_networks=["127.0.0.0/8", "192.0.2.0/24", "2001:db8::/32"])
    assert may_relay("127.0.0.1", relay)
    assert may_relay("192.0.2.200", relay)
    assert may_relay("::ffff:192.0.2.7", relay)  # IPv4-mapped, from a dual-stack socket
    assert may_relay("[2001:db8::1]", relay)
    assert may_relay("IPv6:2001:db8::1", relay)
    assert not may_relay("192.0.3.1", relay)
    assert not may_relay("::1", relay)  # loopback v6 is not 127.0.0.0/8
    assert not may_relay("::ffff:10.0.0.1", relay)
    assert not may_relay("2001:db9::1", relay)
    assert not may_relay("not an ip", relay)
    assert not may_relay("", relay)


def test_may_relay_v6_scope_and_loopback() -> None:
    relay = RelaySection(trusted_networks=["::1/128", "fe80::/10"])
    assert may_relay("::1", relay)
    assert may_relay("fe80::1%eth0", relay)
    assert not may_relay("127.0.0.1", relay)
