"""SCRAM-SHA-256 (RFC 5802 with RFC 7677's SHA-256), server side, without channel binding.

The exchange (RFC 5802 3 and 5)::

    C: client-first   gs2-header client-first-bare        n,,n=user,r=<client nonce>
    S: server-first   r=<client nonce><server nonce>,s=<base64 salt>,i=<iterations>
    C: client-final   c=<base64 gs2-header>,r=<nonce>,p=<base64 ClientProof>
    S: server-final   v=<base64 ServerSignature>          (additional data with success)

    AuthMessage     = client-first-bare "," server-first "," client-final-without-proof
    ClientSignature = HMAC(StoredKey, AuthMessage)
    ClientKey       = ClientProof XOR ClientSignature      and H(ClientKey) must be StoredKey
    ServerSignature = HMAC(ServerKey, AuthMessage)

What is checked (RFC 5802 5.1, 7): the gs2 flag is "n" (client has no channel binding) or "y"
(client could, but thinks we cannot: true, we offer no -PLUS); "p=" is refused since we offer no
SCRAM-SHA-256-PLUS. An authzid ("a=") must equal the user name. The mandatory-extension
attribute "m" fails the exchange; other extensions are ignored. The user name is a saslname
(",", "=" escaped as =2C, =3D), decoded and then SASLprep'd as a query string. "c=" must repeat the
gs2 header exactly and "r=" the combined nonce exactly; the proof is checked with
:func:`hmac.compare_digest`.

For an unknown user (or one without SCRAM keys) the server still answers server-first, with a
salt derived from the decoy secret and the name (so the same unknown name always shows the same
salt, as a real user's would), and fails at the proof like a wrong password would.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import ClassVar

from postroom.sasl.credentials import SALT_OCTETS, ScramKeys
from postroom.sasl.mechanism import Mechanism, SaslSettings
from postroom.sasl.outcomes import Challenge, Failure, FailureKind, Outcome, Success
from postroom.sasl.saslprep import decode_saslname, saslprep


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes | None:
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _printable(value: str) -> bool:
    """RFC 5802 7 ``printable``: %x21-2B / %x2D-7E, at least one."""
    return bool(value) and all(0x21 <= ord(ch) <= 0x7E and ch != "," for ch in value)


def _extensions_ok(attributes: list[str]) -> bool:
    """RFC 5802 7 ``attr-val``: one ALPHA, "=", a value (we ignore what it says)."""
    return all(len(a) >= 2 and a[0].isascii() and a[0].isalpha() and a[1] == "=" for a in attributes)


class ScramSha256(Mechanism):
    name = "SCRAM-SHA-256"
    #: hashlib's name for H() and HMAC()'s hash (RFC 7677 2), and its output size.
    hash_name: ClassVar[str] = "sha256"
    key_octets: ClassVar[int] = 32

    def __init__(self, settings: SaslSettings) -> None:
        super().__init__(settings)
        self._gs2_header = ""
        self._authzid = ""
        self._client_first_bare = ""
        self._server_first: str | None = None
        self._nonce = ""
        self._keys: ScramKeys | None = None
        self._known = False

    def _start(self, initial: bytes | None) -> Outcome:
        if initial is None:
            return Challenge(b"")
        return self._client_first(initial)

    def _respond(self, response: bytes) -> Outcome:
        if self._server_first is None:
            return self._client_first(response)
        return self._client_final(response)

    def _malformed(self, detail: str) -> Failure:
        return self.failure(FailureKind.MALFORMED, f"{self.name} {detail}")

    # --- client-first-message ---

    def _client_first(self, message: bytes) -> Outcome:
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            return self._malformed("message is not UTF-8")
        flag, comma1, rest = text.partition(",")
        authz, comma2, bare = rest.partition(",")
        if flag.startswith("p="):
            return self.failure(FailureKind.REJECTED, "channel binding not supported")
        if flag not in ("n", "y") or not comma1 or not comma2:
            return self._malformed("gs2 header")
        if authz:
            if not authz.startswith("a="):
                return self._malformed("gs2 header")
            try:
                authzid = saslprep(decode_saslname(authz[2:]))
            except ValueError:
                return self._malformed("authzid")
            if not authzid:
                return self._malformed("authzid")
            self._authzid = authzid
        attributes = bare.split(",")
        if attributes[0].startswith("m="):
            return self.failure(FailureKind.REJECTED, "mandatory extension not supported")
        if len(attributes) < 2 or not attributes[0].startswith("n=") or not attributes[1].startswith("r="):
            return self._malformed("client-first-message")
        if not _extensions_ok(attributes[2:]):
            return self._malformed("extension")
        try:
            username = saslprep(decode_saslname(attributes[0][2:]))
        except ValueError:
            return self._malformed("user name")
        client_nonce = attributes[1][2:]
        if not username:
            return self._malformed("user name")
        if not _printable(client_nonce):
            return self._malformed("nonce")
        self._authcid = username
        if self._authzid and self._authzid != username:
            return self.failure(FailureKind.REJECTED, "authorization identity not allowed")

        keys = self._settings.credentials.scram_keys(username, self.name)
        self._known = keys is not None
        self._keys = keys if keys is not None else self._decoy_keys(username)
        self._gs2_header = text[: len(flag) + len(authz) + 2]
        self._client_first_bare = bare
        self._nonce = client_nonce + self._settings.fresh_nonce()
        self._server_first = f"r={self._nonce},s={_b64(self._keys.salt)},i={self._keys.iterations}"
        return Challenge(self._server_first.encode("ascii"))

    def _decoy_keys(self, username: str) -> ScramKeys:
        """Stable made-up keys for a name we have no keys for; no client can match them."""
        secret = self._settings.decoy_secret
        name = username.encode("utf-8")

        def derive(label: bytes) -> bytes:
            return hmac.digest(secret, label + b"\0" + name, self.hash_name)

        return ScramKeys(
            salt=derive(b"SCRAM salt")[:SALT_OCTETS],
            iterations=self._settings.scram_iterations,
            stored_key=derive(b"SCRAM stored key")[: self.key_octets],
            server_key=derive(b"SCRAM server key")[: self.key_octets],
        )

    # --- client-final-message ---

    def _client_final(self, message: bytes) -> Outcome:
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            return self._malformed("message is not UTF-8")
        without_proof, proof_sep, proof_text = text.rpartition(",p=")
        attributes = without_proof.split(",")
        if not proof_sep or len(attributes) < 2:
            return self._malformed("client-final-message")
        binding, nonce = attributes[0], attributes[1]
        if not binding.startswith("c=") or not nonce.startswith("r="):
            return self._malformed("client-final-message")
        if not _extensions_ok(attributes[2:]):
            return self._malformed("extension")
        channel_binding = _unb64(binding[2:])
        proof = _unb64(proof_text)
        if channel_binding is None or proof is None or len(proof) != self.key_octets:
            return self._malformed("base64 attribute")
        if not hmac.compare_digest(channel_binding, self._gs2_header.encode("utf-8")):
            return self.failure(FailureKind.REJECTED, "channel binding data does not match")
        if not hmac.compare_digest(nonce[2:].encode("utf-8"), self._nonce.encode("ascii")):
            return self.failure(FailureKind.REJECTED, "nonce does not match")

        keys = self._keys
        assert keys is not None and self._server_first is not None and self._authcid is not None
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        auth_octets = auth_message.encode("utf-8")
        client_signature = hmac.digest(keys.stored_key, auth_octets, self.hash_name)
        client_key = bytes(p ^ s for p, s in zip(proof, client_signature, strict=True))
        stored_key = hashlib.new(self.hash_name, client_key).digest()
        if not hmac.compare_digest(stored_key, keys.stored_key) or not self._known:
            return self.failure(FailureKind.REJECTED)
        server_signature = hmac.digest(keys.server_key, auth_octets, self.hash_name)
        return Success(self._authcid, self._authzid, b"v=" + _b64(server_signature).encode("ascii"))
