"""The sans-I/O SASL core (RFC 4422), shared by SMTP AUTH, POP3 AUTH and IMAP AUTHENTICATE.

- :mod:`.exchange`: :class:`Exchange` frames one exchange as the protocols carry it (base64,
  "*", the initial response, data with success); :func:`open_exchange` picks the mechanism.
- :mod:`.outcomes`: what an exchange answers: :class:`Challenge`, :class:`PasswordCheck`,
  :class:`Success`, :class:`Failure` (with a :class:`FailureKind`).
- :mod:`.mechanism`: :class:`Mechanism`, its states and transitions; :class:`SaslSettings`,
  everything injected (credential store, nonce source, clock, host name, decoy secrets).
- :mod:`.password`: PLAIN (RFC 4616) and LOGIN; :mod:`.cram`: CRAM-MD5 (RFC 2195);
  :mod:`.scram`: SCRAM-SHA-256 (RFC 5802, RFC 7677).
- :mod:`.credentials`: the :class:`CredentialStore` protocol; SCRAM keys and their RFC 5803 text.
- :mod:`.saslprep`: SASLprep (RFC 4013) and saslname escaping (RFC 5802 5.1).

Nothing here does I/O, reads a clock or draws randomness by itself (the one exception:
:func:`derive_scram_keys` draws a salt when none is given); argon2 checks are handed back to the
caller as :class:`PasswordCheck` requests to run off the event loop.
"""

from postroom.sasl.cram import CramMd5
from postroom.sasl.credentials import (
    SCRAM_SHA_256,
    CredentialStore,
    ScramKeys,
    derive_scram_keys,
    scram_keys_from_text,
    scram_keys_to_text,
)
from postroom.sasl.exchange import (
    DEFAULT_MECHANISMS,
    MAX_RESPONSE_OCTETS,
    MECHANISMS,
    Exchange,
    ExchangeState,
    decode_response,
    open_exchange,
)
from postroom.sasl.mechanism import Mechanism, SaslSettings, State
from postroom.sasl.outcomes import (
    Challenge,
    Failure,
    FailureKind,
    LocalProtocolError,
    Outcome,
    PasswordCheck,
    Success,
)
from postroom.sasl.password import Login, Plain
from postroom.sasl.saslprep import saslprep
from postroom.sasl.scram import ScramSha256

__all__ = [
    "DEFAULT_MECHANISMS",
    "MAX_RESPONSE_OCTETS",
    "MECHANISMS",
    "SCRAM_SHA_256",
    "Challenge",
    "CramMd5",
    "CredentialStore",
    "Exchange",
    "ExchangeState",
    "Failure",
    "FailureKind",
    "LocalProtocolError",
    "Login",
    "Mechanism",
    "Outcome",
    "PasswordCheck",
    "Plain",
    "SaslSettings",
    "ScramKeys",
    "ScramSha256",
    "State",
    "Success",
    "decode_response",
    "derive_scram_keys",
    "open_exchange",
    "saslprep",
    "scram_keys_from_text",
    "scram_keys_to_text",
]
