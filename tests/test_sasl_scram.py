"""SCRAM-SHA-256 (RFC 5802, RFC 7677): the RFC 7677 test vector, an independent client, the checks
a server must make, the stored-key text form and SASLprep (RFC 4013)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.sasl import (
    Challenge,
    Exchange,
    ExchangeState,
    Failure,
    FailureKind,
    LocalProtocolError,
    ScramKeys,
    ScramSha256,
    Success,
    derive_scram_keys,
    open_exchange,
    saslprep,
    scram_keys_from_text,
    scram_keys_to_text,
)
from postroom.sasl.saslprep import decode_saslname, encode_saslname
from tests.sasl_support import MemoryStore, make_settings

# RFC 7677 3: the example exchange, with user "user" and password "pencil".
RFC_SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rfc_store() -> MemoryStore:
    store = MemoryStore()
    store.keys["user"] = derive_scram_keys("pencil", salt=base64.b64decode(RFC_SALT), iterations=4096)
    return store


# --- an independent client, from RFC 5802 3's formulas (no server code used) -------------------


@dataclass
class ScramClient:
    user: str
    password: str
    nonce: str
    gs2_header: str = "n,,"

    def first(self) -> bytes:
        escaped = self.user.replace("=", "=3D").replace(",", "=2C")
        self.first_bare = f"n={escaped},r={self.nonce}"
        return (self.gs2_header + self.first_bare).encode()

    def final(self, server_first: bytes, *, nonce: str | None = None, tamper: bool = False) -> bytes:
        fields = dict(item.split("=", 1) for item in server_first.decode().split(","))
        assert fields["r"].startswith(self.nonce) and len(fields["r"]) > len(self.nonce)
        salted = hashlib.pbkdf2_hmac(
            "sha256", self.password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
        )
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        without_proof = f"c={b64(self.gs2_header.encode())},r={nonce or fields['r']}"
        auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytearray(a ^ b for a, b in zip(client_key, signature, strict=True))
        if tamper:
            proof[0] ^= 0x01
        self.expected_final = b"v=" + base64.b64encode(
            hmac.new(server_key, auth_message, hashlib.sha256).digest()
        )
        return f"{without_proof},p={b64(bytes(proof))}".encode()


def run_first(store: MemoryStore, client_first: bytes, **kwargs: object) -> tuple[ScramSha256, object]:
    mechanism = ScramSha256(make_settings(store, **kwargs))  # type: ignore[arg-type]
    return mechanism, mechanism.start(client_first)


# --- RFC 7677 test vector ----------------------------------------------------------------------


def test_rfc7677_vector_exact_messages() -> None:
    mechanism, server_first = run_first(rfc_store(), RFC_CLIENT_FIRST, nonce=lambda: RFC_SERVER_NONCE)
    assert server_first == Challenge(RFC_SERVER_FIRST)
    assert mechanism.respond(RFC_CLIENT_FINAL) == Success("user", "", RFC_SERVER_FINAL)


def test_rfc7677_vector_through_the_exchange_as_smtp_carries_it() -> None:
    """RFC 4954 has no data with 235: server-final goes in a 334, the client answers empty."""
    ex = open_exchange("scram-sha-256", make_settings(rfc_store(), nonce=lambda: RFC_SERVER_NONCE))
    assert ex is not None
    assert ex.begin(None) == Challenge(b"")  # "334 " and wait for client-first
    server_first = ex.receive(b64(RFC_CLIENT_FIRST))
    assert isinstance(server_first, Challenge) and server_first.data == RFC_SERVER_FIRST
    assert server_first.text == b64(RFC_SERVER_FIRST)
    server_final = ex.receive(b64(RFC_CLIENT_FINAL))
    assert server_final == Challenge(RFC_SERVER_FINAL)
    assert isinstance(server_final, Challenge)
    assert server_final.text == "dj02cnJpVFJCaTIzV3BSUi93dHVwK21NaFVaVW4vZEI1bkxUSlJzamw5NUc0PQ=="
    assert ex.state is ExchangeState.WAIT_ACK
    assert ex.receive("") == Success("user", "", None)
    assert ex.done


def test_rfc7677_vector_with_data_in_the_success_reply() -> None:
    settings = make_settings(rfc_store(), nonce=lambda: RFC_SERVER_NONCE)
    ex = open_exchange("SCRAM-SHA-256", settings, data_with_success=True)
    assert ex is not None
    assert ex.begin(b64(RFC_CLIENT_FIRST)) == Challenge(RFC_SERVER_FIRST)
    outcome = ex.receive(b64(RFC_CLIENT_FINAL))
    assert outcome == Success("user", "", RFC_SERVER_FINAL)
    assert isinstance(outcome, Success) and outcome.text == b64(RFC_SERVER_FINAL)


def test_final_ack_must_be_empty_or_cancel() -> None:
    for line, kind in (("dj0=", FailureKind.MALFORMED), ("*", FailureKind.CANCELLED)):
        ex = open_exchange("SCRAM-SHA-256", make_settings(rfc_store(), nonce=lambda: RFC_SERVER_NONCE))
        assert ex is not None
        ex.begin(b64(RFC_CLIENT_FIRST))
        assert isinstance(ex.receive(b64(RFC_CLIENT_FINAL)), Challenge)
        outcome = ex.receive(line)
        assert isinstance(outcome, Failure) and outcome.kind is kind and outcome.authcid == "user"


def test_the_client_reproduces_the_vector() -> None:
    """The test client is itself checked against RFC 7677 before it checks the server."""
    client = ScramClient("user", "pencil", RFC_CLIENT_NONCE)
    assert client.first() == RFC_CLIENT_FIRST
    assert client.final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert client.expected_final == RFC_SERVER_FINAL


# --- full exchanges with the independent client -------------------------------------------------


@pytest.fixture(scope="module")
def store() -> MemoryStore:
    store = MemoryStore()
    store.keys["alice@example.org"] = derive_scram_keys("correct horse")
    store.keys["a,b=c"] = derive_scram_keys("odd name")
    store.keys["IX"] = derive_scram_keys("roman")
    return store


def exchange(store: MemoryStore, client: ScramClient, **kwargs: object) -> tuple[Exchange, bytes]:
    ex = open_exchange("SCRAM-SHA-256", make_settings(store, **kwargs))  # type: ignore[arg-type]
    assert ex is not None
    server_first = ex.begin(b64(client.first()))
    assert isinstance(server_first, Challenge)
    return ex, server_first.data


def test_full_exchange(store: MemoryStore) -> None:
    client = ScramClient("alice@example.org", "correct horse", "fyko+d2lbbFgONRv9qkxdawL")
    ex, server_first = exchange(store, client, nonce=lambda: "3rfcNHYJY1ZVvWVs7j")
    keys = store.keys["alice@example.org"]
    assert server_first == (
        f"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s={b64(keys.salt)},i=4096".encode()
    )
    final = ex.receive(b64(client.final(server_first)))
    assert final == Challenge(client.expected_final)
    assert ex.receive("") == Success("alice@example.org")


@pytest.mark.parametrize("flag", ["n,,", "y,,", "n,a=alice@example.org,", "y,a=alice@example.org,"])
def test_gs2_flags_n_and_y_and_a_matching_authzid(store: MemoryStore, flag: str) -> None:
    client = ScramClient("alice@example.org", "correct horse", "abcdef", gs2_header=flag)
    ex, server_first = exchange(store, client)
    assert ex.receive(b64(client.final(server_first))) == Challenge(client.expected_final)
    authzid = "alice@example.org" if "a=" in flag else ""
    assert ex.receive("") == Success("alice@example.org", authzid)


def test_wrong_password(store: MemoryStore) -> None:
    client = ScramClient("alice@example.org", "Correct horse", "abcdef")
    ex, server_first = exchange(store, client)
    assert ex.receive(b64(client.final(server_first))) == Failure(
        FailureKind.REJECTED, "bad credentials", "alice@example.org"
    )


def test_tampered_proof(store: MemoryStore) -> None:
    client = ScramClient("alice@example.org", "correct horse", "abcdef")
    ex, server_first = exchange(store, client)
    outcome = ex.receive(b64(client.final(server_first, tamper=True)))
    assert outcome == Failure(FailureKind.REJECTED, "bad credentials", "alice@example.org")


def test_wrong_nonce(store: MemoryStore) -> None:
    client = ScramClient("alice@example.org", "correct horse", "abcdef")
    ex, server_first = exchange(store, client, nonce=lambda: "SERVER")
    # A proof computed correctly, but over a nonce the server did not hand out.
    outcome = ex.receive(b64(client.final(server_first, nonce="abcdefOTHER")))
    assert outcome == Failure(
        FailureKind.REJECTED, "bad credentials: nonce does not match", "alice@example.org"
    )
    # The client's half alone is not enough either.
    ex, server_first = exchange(store, client, nonce=lambda: "SERVER")
    outcome = ex.receive(b64(client.final(server_first, nonce="abcdef")))
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.REJECTED


def test_replayed_final_against_a_new_server_nonce(store: MemoryStore) -> None:
    client = ScramClient("alice@example.org", "correct horse", "abcdef")
    _, server_first = exchange(store, client, nonce=lambda: "FIRST")
    old_final = client.final(server_first)
    ex, _ = exchange(store, client, nonce=lambda: "SECOND")
    assert isinstance(ex.receive(b64(old_final)), Failure)


def test_unknown_user_fails_like_a_wrong_password_with_a_stable_salt(store: MemoryStore) -> None:
    client = ScramClient("nobody@example.org", "whatever", "abcdef")
    ex, server_first = exchange(store, client)
    salts = {server_first.split(b",")[1]}
    assert server_first.endswith(b",i=4096")
    outcome = ex.receive(b64(client.final(server_first)))
    assert outcome == Failure(FailureKind.REJECTED, "bad credentials", "nobody@example.org")
    _, again = exchange(store, ScramClient("nobody@example.org", "x", "zzz"))
    salts.add(again.split(b",")[1])
    assert len(salts) == 1  # the same made-up salt every time, as a real user's would be
    _, other = exchange(store, ScramClient("somebody@example.org", "x", "zzz"))
    assert other.split(b",")[1] not in salts  # and a different one per name


def test_user_name_escapes(store: MemoryStore) -> None:
    client = ScramClient("a,b=c", "odd name", "abcdef")
    assert client.first() == b"n,,n=a=2Cb=3Dc,r=abcdef"
    ex, server_first = exchange(store, client)
    ex.receive(b64(client.final(server_first)))
    assert ex.receive("") == Success("a,b=c")


def test_user_name_is_saslprepped(store: MemoryStore) -> None:
    """RFC 4013 3's example: "I<U+00AD>X" (soft hyphen) and "<U+2168>" (Roman numeral nine) are "IX"."""
    for name in ("I\u00adX", "\u2168"):
        client = ScramClient(name, "roman", "abcdef")
        ex, server_first = exchange(store, client)
        ex.receive(b64(client.final(server_first)))
        assert ex.receive("") == Success("IX")


@pytest.mark.parametrize(
    "client_first",
    [
        b"p=tls-unique,,n=alice@example.org,r=abc",  # channel binding: we offer no -PLUS
        b"p=tls-server-end-point,,n=alice@example.org,r=abc",
        b"n,a=bob@example.org,n=alice@example.org,r=abc",  # proxy authorisation
        b"n,,m=ext,n=alice@example.org,r=abc",  # a mandatory extension we do not know
    ],
)
def test_client_first_refused(store: MemoryStore, client_first: bytes) -> None:
    _, outcome = run_first(store, client_first)
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.REJECTED


@pytest.mark.parametrize(
    "client_first",
    [
        b"",
        b"n",
        b"n,",
        b"x,,n=alice,r=abc",  # unknown gs2 flag
        b"N,,n=alice,r=abc",
        b"n,b=alice,n=alice,r=abc",  # authzid without "a="
        b"n,a=,n=alice,r=abc",  # empty authzid
        b"n,,r=abc,n=alice",  # attributes out of order
        b"n,,n=alice",  # no nonce
        b"n,,n=alice,r=",  # empty nonce
        b"n,,n=alice,r=a b",  # space is not printable in a nonce
        b"n,,n=,r=abc",  # empty user name
        b"n,,n=al=2cice,r=abc",  # escapes are upper case only
        b"n,,n=al=ice,r=abc",  # bare "="
        b"n,,n=al\x07ice,r=abc",  # SASLprep: control character
        b"n,,n=\xd8\xa71,r=abc",  # SASLprep: right-to-left then a digit (RFC 4013 3)
        b"n,,n=alice,r=abc,1=x",  # extension name must be a letter
        b"n,,n=alice,r=abc,",  # trailing empty attribute
        b"n,,n=al\xffice,r=abc",  # not UTF-8
    ],
)
def test_client_first_malformed(store: MemoryStore, client_first: bytes) -> None:
    _, outcome = run_first(store, client_first)
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.MALFORMED, outcome


def test_client_first_extensions_are_ignored(store: MemoryStore) -> None:
    _, outcome = run_first(store, b"n,,n=alice@example.org,r=abc,x=something,z=")
    assert isinstance(outcome, Challenge)


def _after_first(store: MemoryStore, client: ScramClient) -> tuple[ScramSha256, bytes]:
    mechanism, server_first = run_first(store, client.first())
    assert isinstance(server_first, Challenge)
    return mechanism, server_first.data


@pytest.mark.parametrize(
    ("mutate", "kind"),
    [
        (lambda m: m.replace(b"c=biws", b"c=eSws"), FailureKind.REJECTED),  # gs2 header "y,," not "n,,"
        (lambda m: m.replace(b"c=biws", b"c=bixhPWFsaWNlLA=="), FailureKind.REJECTED),  # with an authzid
        (lambda m: m.replace(b"c=biws", b"c=biws!"), FailureKind.MALFORMED),
        (lambda m: m.split(b",p=")[0], FailureKind.MALFORMED),  # no proof
        (lambda m: m.split(b",p=")[0] + b",p=AAAA", FailureKind.MALFORMED),  # proof too short
        (lambda m: m.split(b",p=")[0] + b",p=", FailureKind.MALFORMED),
        (lambda m: m.replace(b"c=biws,", b""), FailureKind.MALFORMED),  # no channel binding
        (lambda m: m.replace(b",r=", b",x=x,r="), FailureKind.MALFORMED),  # nonce not second
        (lambda m: m.replace(b",p=", b",1=2,p="), FailureKind.MALFORMED),  # bad extension name
        (lambda m: m + b"\xff", FailureKind.MALFORMED),
    ],
)
def test_client_final_checks(store: MemoryStore, mutate: object, kind: FailureKind) -> None:
    client = ScramClient("alice@example.org", "correct horse", "abcdef")
    mechanism, server_first = _after_first(store, client)
    outcome = mechanism.respond(mutate(client.final(server_first)))  # type: ignore[operator]
    assert isinstance(outcome, Failure) and outcome.kind is kind, outcome


def test_client_final_extension_is_covered_by_the_proof(store: MemoryStore) -> None:
    """An extension in client-final is ignored but still part of AuthMessage: adding one after the
    proof was computed breaks the proof."""
    client = ScramClient("alice@example.org", "correct horse", "abcdef")
    mechanism, server_first = _after_first(store, client)
    final = client.final(server_first).replace(b",p=", b",x=added,p=")
    assert mechanism.respond(final) == Failure(FailureKind.REJECTED, "bad credentials", "alice@example.org")


def test_after_the_outcome_the_mechanism_is_done(store: MemoryStore) -> None:
    client = ScramClient("alice@example.org", "correct horse", "abcdef")
    mechanism, server_first = _after_first(store, client)
    assert isinstance(mechanism.respond(client.final(server_first)), Success)
    with pytest.raises(LocalProtocolError):
        mechanism.respond(b"")


# --- keys and their text form -------------------------------------------------------------------


def test_derived_keys_follow_the_formulas() -> None:
    salt = bytes(range(16))
    keys = derive_scram_keys("pencil", salt=salt, iterations=4096)
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    assert keys.salt == salt and keys.iterations == 4096
    assert keys.stored_key == hashlib.sha256(client_key).digest()
    assert keys.server_key == hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    assert "stored_key" not in repr(keys) and keys.stored_key.hex() not in repr(keys)


def test_derived_keys_get_a_fresh_salt() -> None:
    first, second = derive_scram_keys("pencil"), derive_scram_keys("pencil")
    assert len(first.salt) == 16 and first.salt != second.salt
    assert first.stored_key != second.stored_key


def test_derive_refuses_empty_password_and_low_iterations() -> None:
    with pytest.raises(ValueError, match="empty"):
        derive_scram_keys("")
    with pytest.raises(ValueError, match="iterations"):
        derive_scram_keys("pencil", iterations=4095)


def test_password_is_saslprepped_when_derived() -> None:
    """RFC 4013: "I<U+00AD>X" is stored as "IX" (and NFKC: U+2168 too)."""
    salt = b"0123456789abcdef"
    plain = derive_scram_keys("IX", salt=salt)
    assert derive_scram_keys("I\u00adX", salt=salt) == plain
    assert derive_scram_keys("\u2168", salt=salt) == plain
    # A password SASLprep refuses (a control character) is used as given, not refused.
    assert derive_scram_keys("a\u0007b", salt=salt).stored_key != plain.stored_key


def test_text_form_rfc5803() -> None:
    keys = derive_scram_keys("pencil", salt=base64.b64decode(RFC_SALT), iterations=4096)
    text = scram_keys_to_text(keys)
    scheme, info, value = text.split("$")
    assert scheme == "SCRAM-SHA-256"
    assert info == f"4096:{RFC_SALT}"
    assert value == f"{b64(keys.stored_key)}:{b64(keys.server_key)}"
    assert scram_keys_from_text(text) == keys


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$0:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
        "SCRAM-SHA-256$x:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
        "SCRAM-SHA-256$4096:$" + b64(bytes(32)) + ":" + b64(bytes(32)),
        "SCRAM-SHA-256$4096:c2FsdA==$" + b64(bytes(31)) + ":" + b64(bytes(32)),
        "SCRAM-SHA-256$4096:c2FsdA==$" + b64(bytes(32)),
        "SCRAM-SHA-256$4096:c2F!sdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
        "SCRAM-SHA-256$\u0664096:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
    ],
)
def test_text_form_malformed(text: str) -> None:
    with pytest.raises(ValueError) as info:
        scram_keys_from_text(text)
    assert str(info.value) == "not an RFC 5803 SCRAM-SHA-256 string"


def test_keys_validate_themselves() -> None:
    with pytest.raises(ValueError):
        ScramKeys(b"", 4096, bytes(32), bytes(32))
    with pytest.raises(ValueError):
        ScramKeys(b"s", 4096, bytes(20), bytes(32))


@settings(max_examples=25, deadline=None)
@given(password=st.text(min_size=1, max_size=20), iterations=st.integers(4096, 4200))
def test_any_password_round_trips_through_text_and_a_full_exchange(password: str, iterations: int) -> None:
    keys = derive_scram_keys(password, iterations=iterations)
    store = MemoryStore(keys={"user": scram_keys_from_text(scram_keys_to_text(keys))})
    try:
        prepared = saslprep(password, stored=True) or password
    except ValueError:
        prepared = password
    client = ScramClient("user", prepared, "clientnonce")
    ex, server_first = exchange(store, client)
    assert ex.receive(b64(client.final(server_first))) == Challenge(client.expected_final)
    assert ex.receive("") == Success("user")


# --- SASLprep (RFC 4013 3, examples) and saslname -----------------------------------------------


@pytest.mark.parametrize(
    ("given_", "expected"),
    [
        ("I\u00adX", "IX"),  # soft hyphen mapped to nothing
        ("user", "user"),  # no transformation
        ("USER", "USER"),  # case preserved
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("a\u00a0b", "a b"),  # non-ASCII space mapped to space
        ("", ""),
    ],
)
def test_saslprep_examples(given_: str, expected: str) -> None:
    assert saslprep(given_) == expected


@pytest.mark.parametrize("bad", ["\u0007", "\u0627\u0031", "a\ue000", "a\u200e", "\U000e0001"])
def test_saslprep_prohibited(bad: str) -> None:
    """RFC 4013 3: U+0007 is prohibited; U+0627 U+0031 breaks the bidi rule. Also private use,
    a change-display-properties mark, a tagging character."""
    with pytest.raises(ValueError, match="SASLprep") as info:
        saslprep(bad)
    assert bad not in str(info.value)


def test_saslprep_unassigned_only_in_queries() -> None:
    unassigned = "\u0221"  # unassigned in Unicode 3.2, the stringprep version
    assert saslprep("a" + unassigned) == "a" + unassigned
    with pytest.raises(ValueError, match="unassigned"):
        saslprep("a" + unassigned, stored=True)


def test_saslname_round_trip() -> None:
    assert encode_saslname("a,b=c=2C") == "a=2Cb=3Dc=3D2C"
    assert decode_saslname("a=2Cb=3Dc=3D2C") == "a,b=c=2C"
    for bad in ("a=", "a=2", "a=2c", "a=4A", "a,b"):
        with pytest.raises(ValueError):
            decode_saslname(bad)


# --- fuzzing with structure: messages that get past the first checks ----------------------------


@settings(max_examples=200, deadline=None)
@given(
    flag=st.sampled_from(["n,,", "y,,", "n,a=x,", "p=x,,", "n,a=,", ""]),
    user=st.text(max_size=12),
    client_nonce=st.text(max_size=8),
    extra=st.text(max_size=12),
    proof=st.binary(max_size=40),
    binding=st.sampled_from(["biws", "eSws", "", "!"]),
)
def test_structured_messages_never_authenticate_nor_raise(
    flag: str, user: str, client_nonce: str, extra: str, proof: bytes, binding: str
) -> None:
    store = MemoryStore(keys={"x": derive_scram_keys("pencil", salt=b"0123456789abcdef")})
    mechanism = ScramSha256(make_settings(store))
    first = mechanism.start(f"{flag}n={encode_saslname(user)},r={client_nonce}{extra}".encode())
    assert isinstance(first, Challenge | Failure)
    if isinstance(first, Challenge):
        nonce = first.data.split(b",")[0][2:].decode()
        outcome = mechanism.respond(f"c={binding},r={nonce}{extra},p={b64(proof)}".encode())
        assert isinstance(outcome, Failure)
        assert outcome.kind in (FailureKind.REJECTED, FailureKind.MALFORMED)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20))
def test_saslprep_returns_text_or_value_error(value: str) -> None:
    try:
        prepared = saslprep(value)
    except ValueError as error:
        assert str(error).startswith("SASLprep: ")
    else:
        assert isinstance(prepared, str)
