"""The SASL core: the exchange framing (base64, "*", "="), PLAIN, LOGIN, CRAM-MD5, misuse, fuzzing.

SCRAM-SHA-256 has its own file (test_sasl_scram.py); swaks against the core in test_sasl_swaks.py.
"""

from __future__ import annotations

import base64
import hmac

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom.accounts.passwords import hash_password
from postroom.sasl import (
    DEFAULT_MECHANISMS,
    MAX_RESPONSE_OCTETS,
    MECHANISMS,
    Challenge,
    CramMd5,
    Exchange,
    ExchangeState,
    Failure,
    FailureKind,
    LocalProtocolError,
    Outcome,
    PasswordCheck,
    Plain,
    State,
    Success,
    open_exchange,
)
from tests.sasl_support import FAST, MemoryStore, make_settings

PASSWORD = "correct horse"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def store() -> MemoryStore:
    store = MemoryStore()
    store.add("alice@example.org", PASSWORD, cram=True)
    store.add("bob@example.org", "bobs password")  # no CRAM-MD5 secret: did not opt in
    return store


def exchange(store: MemoryStore, name: str, **kwargs: object) -> Exchange:
    offered = (*DEFAULT_MECHANISMS, "CRAM-MD5")
    made = open_exchange(name, make_settings(store, **kwargs), offered=offered)  # type: ignore[arg-type]
    assert made is not None
    return made


def resolve(ex: Exchange, outcome: Outcome) -> Outcome:
    """Run a PasswordCheck as the transport would (here inline) and report the result."""
    assert isinstance(outcome, PasswordCheck)
    return ex.password_checked(outcome.check())


def rejected(outcome: Outcome, authcid: str | None) -> None:
    assert outcome == Failure(FailureKind.REJECTED, "bad credentials", authcid)


# --- the exchange: opening, base64, "*", "=" ------------------------------------------------------


def test_open_exchange_names_any_case_and_only_offered(store: MemoryStore) -> None:
    settings = make_settings(store)
    ex = open_exchange("plain", settings)
    assert ex is not None and isinstance(ex.mechanism, Plain)
    assert open_exchange("CRAM-MD5", settings) is None  # implemented, not offered by default
    assert isinstance(
        (cram := open_exchange("cram-md5", settings, offered=["CRAM-MD5"])) and cram.mechanism, CramMd5
    )
    assert open_exchange("DIGEST-MD5", settings, offered=["DIGEST-MD5"]) is None  # not implemented
    assert open_exchange("LOGIN", settings, offered=["PLAIN"]) is None
    assert set(MECHANISMS) == {"PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"}
    assert DEFAULT_MECHANISMS == ("SCRAM-SHA-256", "PLAIN", "LOGIN")


def test_challenge_text_is_base64_and_empty_for_no_data() -> None:
    assert Challenge(b"Username:").text == "VXNlcm5hbWU6"
    assert Challenge(b"").text == ""
    assert Success("a", "", b"v=x").text == "dj14"
    assert Success("a").text is None


@pytest.mark.parametrize("name", ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"])
def test_star_cancels_after_the_first_challenge(store: MemoryStore, name: str) -> None:
    ex = exchange(store, name)
    assert isinstance(ex.begin(None), Challenge)
    assert ex.receive("*") == Failure(FailureKind.CANCELLED, "cancelled by the client", None)
    assert ex.done
    with pytest.raises(LocalProtocolError):
        ex.receive("*")


def test_star_cancels_login_after_the_user_name(store: MemoryStore) -> None:
    ex = exchange(store, "LOGIN")
    assert ex.begin(None) == Challenge(b"Username:")
    assert ex.receive(b64(b"alice@example.org")) == Challenge(b"Password:")
    assert ex.receive(b"*") == Failure(FailureKind.CANCELLED, "cancelled by the client", "alice@example.org")


@pytest.mark.parametrize(
    "line",
    [
        "not base64!",
        "YWJj\r",  # the line ending is the transport's to strip
        "YWJjZA",  # padding missing (RFC 4648 3.2: required here)
        "YW Jj",
        "=",  # "=" is the empty *initial* response only (RFC 4954 4)
        "**",
        "YWJj\u00e9",
        b"YWJj\xff",
        "=AAA",  # RFC 4954 4's own examples of "=" where it may not be
        "AAA=BBB",
        "YWJj=YWJj",
        "YQ=",
    ],
)
def test_bad_base64_is_a_syntax_failure(store: MemoryStore, line: str | bytes) -> None:
    ex = exchange(store, "PLAIN")
    assert ex.begin(None) == Challenge(b"")
    assert ex.receive(line) == Failure(FailureKind.MALFORMED, "malformed response: not base64", None)
    assert ex.state is ExchangeState.DONE


def test_bad_base64_initial_response(store: MemoryStore) -> None:
    ex = exchange(store, "PLAIN")
    assert ex.begin("AGFsaWNl!") == Failure(FailureKind.MALFORMED, "malformed response: not base64", None)


def test_overlong_response_line(store: MemoryStore) -> None:
    ex = exchange(store, "PLAIN")
    ex.begin(None)
    line = b64(b"x" * (MAX_RESPONSE_OCTETS // 4 * 3 + 3))
    assert len(line) > MAX_RESPONSE_OCTETS
    outcome = ex.receive(line)
    assert outcome == Failure(FailureKind.TOO_LONG, "response too long", None)


def test_equals_sign_is_an_empty_initial_response_not_none(store: MemoryStore) -> None:
    # No initial response: PLAIN asks with an empty challenge (334 with nothing after it).
    assert exchange(store, "PLAIN").begin(None) == Challenge(b"")
    # "=": an initial response of zero octets, which PLAIN cannot parse.
    outcome = exchange(store, "PLAIN").begin("=")
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.MALFORMED
    # SCRAM: none gets the empty challenge; "=" is an empty client-first-message, malformed.
    assert exchange(store, "SCRAM-SHA-256").begin(None) == Challenge(b"")
    outcome = exchange(store, "SCRAM-SHA-256").begin(b"=")
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.MALFORMED


def test_empty_response_line_is_an_empty_response(store: MemoryStore) -> None:
    ex = exchange(store, "LOGIN")
    ex.begin(None)
    assert ex.receive("") == Failure(FailureKind.MALFORMED, "malformed response: empty user name", None)


def test_store_failure_is_a_temporary_failure(store: MemoryStore) -> None:
    broken = MemoryStore(broken=True)
    for name, initial in [
        ("PLAIN", b"\0alice@example.org\0pw"),
        ("SCRAM-SHA-256", b"n,,n=alice,r=abc"),
    ]:
        ex = exchange(broken, name)
        outcome = ex.begin(b64(initial))
        assert isinstance(outcome, Failure)
        assert (outcome.kind, outcome.reason) == (FailureKind.UNAVAILABLE, "credentials unavailable")
    ex = exchange(broken, "CRAM-MD5")
    ex.begin(None)
    outcome = ex.receive(b64(b"alice " + b"0" * 32))
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.UNAVAILABLE


def test_misuse_is_a_local_error(store: MemoryStore) -> None:
    ex = exchange(store, "PLAIN")
    with pytest.raises(LocalProtocolError):
        ex.receive("")  # before begin()
    with pytest.raises(LocalProtocolError):
        ex.password_checked(True)  # nothing asked
    ex.begin(None)
    with pytest.raises(LocalProtocolError):
        ex.begin(None)  # twice
    outcome = ex.receive(b64(b"\0alice@example.org\0" + PASSWORD.encode()))
    assert isinstance(outcome, PasswordCheck)
    with pytest.raises(LocalProtocolError):
        ex.receive("")  # while the check is out
    assert isinstance(ex.password_checked(outcome.check()), Success)
    with pytest.raises(LocalProtocolError):
        ex.password_checked(True)  # after the end

    mechanism = CramMd5(make_settings(store))
    with pytest.raises(LocalProtocolError):
        mechanism.respond(b"x")
    mechanism.start(None)
    with pytest.raises(LocalProtocolError):
        mechanism.password_checked(True)  # CRAM-MD5 never asks
    assert mechanism.state is State.WAIT_RESPONSE


def test_a_broken_nonce_source_is_our_error(store: MemoryStore) -> None:
    for bad in ("", "has,comma", "space inside", "caf\u00e9"):
        mechanism = CramMd5(make_settings(store, nonce=lambda bad=bad: bad))  # type: ignore[misc]
        with pytest.raises(LocalProtocolError):
            mechanism.start(None)


# --- PLAIN (RFC 4616) ---------------------------------------------------------------------------


def test_plain_with_initial_response(store: MemoryStore) -> None:
    ex = exchange(store, "PLAIN")
    outcome = ex.begin(b64(b"\0alice@example.org\0" + PASSWORD.encode()))
    assert isinstance(outcome, PasswordCheck)
    assert (outcome.authcid, outcome.authzid) == ("alice@example.org", "")
    assert outcome.password_hash == store.hashes["alice@example.org"]
    assert ex.state is ExchangeState.WAIT_CHECK
    assert ex.password_checked(outcome.check()) == Success("alice@example.org", "", None)
    assert ex.done


def test_plain_without_initial_response(store: MemoryStore) -> None:
    ex = exchange(store, "PLAIN")
    assert ex.begin(None) == Challenge(b"")
    outcome = ex.receive(b64(b"\0alice@example.org\0" + PASSWORD.encode()))
    assert resolve(ex, outcome) == Success("alice@example.org")


def test_plain_with_authzid_equal_to_authcid(store: MemoryStore) -> None:
    ex = exchange(store, "PLAIN")
    outcome = ex.begin(b64(b"alice@example.org\0alice@example.org\0" + PASSWORD.encode()))
    assert resolve(ex, outcome) == Success("alice@example.org", "alice@example.org")


def test_plain_authzid_is_compared_after_saslprep(store: MemoryStore) -> None:
    ex = exchange(store, "PLAIN")
    # U+FF41 FULLWIDTH LATIN SMALL LETTER A is "a" after NFKC: the same identity.
    outcome = ex.begin(b64("\uff41lice@example.org\0alice@example.org\0correct horse".encode()))
    assert resolve(ex, outcome) == Success("alice@example.org", "\uff41lice@example.org")
    for authzid in ("alice@example.org\u0007", "\u00ad"):  # SASLprep refuses; maps to ""
        outcome = exchange(store, "PLAIN").begin(b64(f"{authzid}\0alice@example.org\0x".encode()))
        assert isinstance(outcome, Failure) and outcome.kind is FailureKind.REJECTED


def test_plain_with_another_authzid_fails_before_any_lookup(store: MemoryStore) -> None:
    fresh = MemoryStore()
    ex = exchange(fresh, "PLAIN")
    outcome = ex.begin(b64(b"bob@example.org\0alice@example.org\0" + PASSWORD.encode()))
    assert outcome == Failure(
        FailureKind.REJECTED, "bad credentials: authorization identity not allowed", "alice@example.org"
    )
    assert fresh.lookups == []


def test_plain_wrong_password_and_unknown_user_look_alike(store: MemoryStore) -> None:
    ex = exchange(store, "PLAIN")
    rejected(resolve(ex, ex.begin(b64(b"\0alice@example.org\0wrong"))), "alice@example.org")
    ex = exchange(store, "PLAIN")
    outcome = ex.begin(b64(b"\0nobody@example.org\0wrong"))
    assert isinstance(outcome, PasswordCheck) and outcome.password_hash is None
    rejected(resolve(ex, outcome), "nobody@example.org")


def test_plain_unknown_user_runs_the_decoy_hash(store: MemoryStore) -> None:
    decoy = hash_password("no one's password", FAST)
    ex = exchange(store, "PLAIN", decoy_hash=decoy)
    outcome = ex.begin(b64(b"\0nobody@example.org\0no one's password"))
    assert isinstance(outcome, PasswordCheck) and outcome.decoy_hash == decoy
    assert outcome.check() is False  # even the decoy's own password does not log anyone in


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"alice@example.org" + b"\0" + PASSWORD.encode(), "PLAIN needs authzid NUL authcid NUL passwd"),
        (b"alice@example.org " + PASSWORD.encode(), "PLAIN needs authzid NUL authcid NUL passwd"),
        (b"\0alice@example.org\0pass\0word", "PLAIN needs authzid NUL authcid NUL passwd"),
        (b"", "PLAIN needs authzid NUL authcid NUL passwd"),
        (b"\0alice@example.org\0", "empty password"),
        (b"\0\0" + PASSWORD.encode(), "empty authentication identity"),
        (b"\0alice@example.org\0\xff\xfe", "PLAIN fields are not UTF-8"),
    ],
)
def test_plain_malformed(store: MemoryStore, message: bytes, reason: str) -> None:
    outcome = exchange(store, "PLAIN").begin(b64(message))
    assert isinstance(outcome, Failure)
    assert (outcome.kind, outcome.reason) == (FailureKind.MALFORMED, f"malformed response: {reason}")


def test_plain_utf8_password(store: MemoryStore) -> None:
    local = MemoryStore()
    local.add("z\u00fcrich@example.org", "gr\u00fc\u00dfe \u2603")
    ex = exchange(local, "PLAIN")
    outcome = ex.begin(b64("\0z\u00fcrich@example.org\0gr\u00fc\u00dfe \u2603".encode()))
    assert resolve(ex, outcome) == Success("z\u00fcrich@example.org")


def test_password_never_shows_in_repr_or_failure(store: MemoryStore) -> None:
    ex = exchange(store, "PLAIN")
    outcome = ex.begin(b64(b"\0alice@example.org\0s3cret-Pa55"))
    assert isinstance(outcome, PasswordCheck)
    assert "s3cret" not in repr(outcome) and "argon2" not in repr(outcome)
    failure = ex.password_checked(outcome.check())
    assert "s3cret" not in repr(failure)
    for message in (b"\0alice@example.org\0s3cret\0x", b"alice\0bob\0s3cret"):
        assert "s3cret" not in repr(exchange(store, "PLAIN").begin(b64(message)))


# --- LOGIN --------------------------------------------------------------------------------------


def test_login(store: MemoryStore) -> None:
    ex = exchange(store, "LOGIN")
    assert ex.begin(None) == Challenge(b"Username:")
    assert ex.receive("YWxpY2VAZXhhbXBsZS5vcmc=") == Challenge(b"Password:")  # alice@example.org
    outcome = ex.receive(b64(PASSWORD.encode()))
    assert isinstance(outcome, PasswordCheck) and outcome.authcid == "alice@example.org"
    assert ex.password_checked(outcome.check()) == Success("alice@example.org")


def test_login_challenges_on_the_wire(store: MemoryStore) -> None:
    ex = exchange(store, "LOGIN")
    first = ex.begin(None)
    assert isinstance(first, Challenge) and first.text == "VXNlcm5hbWU6"
    second = ex.receive(b64(b"alice@example.org"))
    assert isinstance(second, Challenge) and second.text == "UGFzc3dvcmQ6"


def test_login_with_the_user_name_as_initial_response(store: MemoryStore) -> None:
    ex = exchange(store, "LOGIN")
    assert ex.begin(b64(b"alice@example.org")) == Challenge(b"Password:")
    assert resolve(ex, ex.receive(b64(PASSWORD.encode()))) == Success("alice@example.org")


def test_login_wrong_password(store: MemoryStore) -> None:
    ex = exchange(store, "LOGIN")
    ex.begin(None)
    ex.receive(b64(b"alice@example.org"))
    rejected(resolve(ex, ex.receive(b64(b"Correct Horse"))), "alice@example.org")


def test_login_empty_password_and_bad_text(store: MemoryStore) -> None:
    ex = exchange(store, "LOGIN")
    ex.begin(b64(b"alice@example.org"))
    assert ex.receive("") == Failure(
        FailureKind.MALFORMED, "malformed response: empty password", "alice@example.org"
    )
    ex = exchange(store, "LOGIN")
    ex.begin(None)
    outcome = ex.receive(b64(b"al\0ice"))
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.MALFORMED
    outcome = exchange(store, "LOGIN").begin("=")  # an empty user name as initial response
    assert outcome == Failure(FailureKind.MALFORMED, "malformed response: empty user name", None)


# --- CRAM-MD5 (RFC 2195) ------------------------------------------------------------------------


def test_cram_md5_rfc2195_example() -> None:
    """RFC 2195 2: the example exchange, byte for byte."""
    store = MemoryStore(cram={"tim": "tanstaaftanstaaf"})
    ex = exchange(
        store,
        "CRAM-MD5",
        nonce=lambda: "1896",
        clock=lambda: 697170952.9,
        hostname="postoffice.reston.mci.net",
    )
    challenge = ex.begin(None)
    assert challenge == Challenge(b"<1896.697170952@postoffice.reston.mci.net>")
    assert isinstance(challenge, Challenge)
    assert challenge.text == "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+"
    assert ex.receive("dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw") == Success("tim")


def cram_client(user: str, secret: str, challenge_text: str) -> str:
    """A CRAM-MD5 client as RFC 2195 describes it, from the base64 challenge to the base64 answer."""
    challenge = base64.b64decode(challenge_text)
    digest = hmac.new(secret.encode(), challenge, "md5").hexdigest()
    return b64(f"{user} {digest}".encode())


def test_cram_md5_challenge_shape_and_client(store: MemoryStore) -> None:
    ex = exchange(store, "CRAM-MD5", nonce=lambda: "Xq3_-Tz9", clock=lambda: 1_700_000_000.99)
    challenge = ex.begin(None)
    assert challenge == Challenge(b"<Xq3_-Tz9.1700000000@mail.example>")
    assert isinstance(challenge, Challenge)
    assert ex.receive(cram_client("alice@example.org", PASSWORD, challenge.text)) == Success(
        "alice@example.org"
    )


def test_cram_md5_upper_case_hex_is_taken(store: MemoryStore) -> None:
    ex = exchange(store, "CRAM-MD5")
    challenge = ex.begin(None)
    assert isinstance(challenge, Challenge)
    digest = hmac.new(PASSWORD.encode(), challenge.data, "md5").hexdigest().upper()
    assert ex.receive(b64(f"alice@example.org {digest}".encode())) == Success("alice@example.org")


@pytest.mark.parametrize(
    ("user", "secret"),
    [
        ("alice@example.org", "wrong"),  # wrong secret
        ("nobody@example.org", PASSWORD),  # unknown user
        ("bob@example.org", "bobs password"),  # right password, but bob has no CRAM-MD5 secret
    ],
)
def test_cram_md5_failures_look_alike(store: MemoryStore, user: str, secret: str) -> None:
    ex = exchange(store, "CRAM-MD5")
    challenge = ex.begin(None)
    assert isinstance(challenge, Challenge)
    rejected(ex.receive(cram_client(user, secret, challenge.text)), user)


def test_cram_md5_digest_from_another_challenge_fails(store: MemoryStore) -> None:
    first = exchange(store, "CRAM-MD5", nonce=lambda: "one")
    second = exchange(store, "CRAM-MD5", nonce=lambda: "two")
    old = first.begin(None)
    second.begin(None)
    assert isinstance(old, Challenge)
    rejected(second.receive(cram_client("alice@example.org", PASSWORD, old.text)), "alice@example.org")


@pytest.mark.parametrize(
    "response",
    [
        b"alice@example.org",
        b"alice@example.org " + b"0" * 31,
        b" " + b"0" * 32,
        b"alice " + b"g" * 32,
        b"\xff 0",
    ],
)
def test_cram_md5_malformed(store: MemoryStore, response: bytes) -> None:
    ex = exchange(store, "CRAM-MD5")
    ex.begin(None)
    outcome = ex.receive(b64(response))
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.MALFORMED


def test_cram_md5_refuses_an_initial_response(store: MemoryStore) -> None:
    outcome = exchange(store, "CRAM-MD5").begin(b64(b"alice"))
    assert outcome == Failure(FailureKind.INITIAL_RESPONSE_REFUSED, "initial response not allowed", None)


# --- fuzzing: whatever the client sends, the answer is a typed outcome --------------------------

MECHANISM_NAMES = sorted(MECHANISMS)
_FUZZ_STORE = MemoryStore()
_FUZZ_STORE.add("user", "pencil", cram=True)


def _drive(ex: Exchange, outcome: Outcome, lines: list[bytes]) -> None:
    for line in lines:
        if isinstance(outcome, PasswordCheck):
            outcome = ex.password_checked(outcome.check())
        if isinstance(outcome, Success | Failure):
            assert ex.done
            return
        assert isinstance(outcome, Challenge)
        outcome = ex.receive(line)
    assert isinstance(outcome, Challenge | PasswordCheck | Success | Failure)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(MECHANISM_NAMES),
    initial=st.none() | st.binary(max_size=80),
    responses=st.lists(st.binary(max_size=120), max_size=4),
)
def test_random_responses_to_every_mechanism(
    name: str, initial: bytes | None, responses: list[bytes]
) -> None:
    """Decoded responses straight into the mechanism: only typed outcomes, never an exception."""
    mechanism = MECHANISMS[name](make_settings(_FUZZ_STORE))
    outcome = mechanism.start(initial)
    for response in responses:
        if isinstance(outcome, PasswordCheck):
            outcome = mechanism.password_checked(outcome.check())
        if isinstance(outcome, Success | Failure):
            assert mechanism.state is State.DONE
            break
        assert isinstance(outcome, Challenge)
        outcome = mechanism.respond(response)
    assert isinstance(outcome, Challenge | PasswordCheck | Success | Failure)
    if isinstance(outcome, Success):  # random bytes that authenticate: only PLAIN/LOGIN's check can
        pytest.fail(f"random input authenticated: {outcome}")


_B64ISH = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=* \r", max_size=60
)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(MECHANISM_NAMES),
    initial=st.none() | _B64ISH | st.binary(max_size=40).map(lambda b: b64(b)),
    lines=st.lists(
        _B64ISH.map(str.encode)
        | st.binary(max_size=60)
        | st.binary(max_size=90).map(lambda b: b64(b).encode()),
        max_size=4,
    ),
)
def test_random_lines_through_the_exchange(name: str, initial: str | None, lines: list[bytes]) -> None:
    ex = exchange(_FUZZ_STORE, name)
    _drive(ex, ex.begin(initial), lines)
