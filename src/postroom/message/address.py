"""Mail addresses and RFC 5321 paths (with RFC 6531 SMTPUTF8).

:func:`parse_path` reads the ``Reverse-path`` of MAIL and the ``Forward-path`` of RCPT (RFC 5321
4.1.2): ``<local@domain>`` where the local part is a Dot-string or a Quoted-string and the domain a
name or an address literal (4.1.3: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``). Also accepted:

- a source route ``<@a,@b:user@d>`` (4.1.1.3: accepted, and the route ignored);
- the null path ``<>`` and the bare ``<Postmaster>`` (4.5.1); which command may carry which is the
  caller's business (MAIL may be ``<>``, RCPT may be ``<Postmaster>``);
- like Postfix, a path without angle brackets when it has no spaces (``MAIL FROM:a@b``).

Non-ASCII is allowed only with ``utf8=True`` (RFC 6531 3.3: the client sent SMTPUTF8); otherwise
it is refused with 553 5.6.7 (RFC 6531 3.5). Lengths are RFC 5321 4.5.3.1 limits in octets;
exceeding one is answered like a syntax error, 501, as 4.5.3.1's own example "501 Path too long".

:class:`AddressError` is a ``ValueError`` carrying the parts of its reply. It does not carry a
``Reply`` object because this package sits below ``postroom.smtp``. A syntax error leaves
``status`` as ``None``: the caller answers X.1.7 for a sender and X.1.3 for a recipient
(RFC 3463 3.2).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from typing import Final

LOCAL_PART: Final = 64  # RFC 5321 4.5.3.1.1: octets of a local part
DOMAIN: Final = 255  # RFC 5321 4.5.3.1.2: octets of a domain
PATH: Final = 256  # RFC 5321 4.5.3.1.3: octets of a path, "<", ">" and source route included
LABEL: Final = 63  # RFC 1035 2.3.4: octets of one DNS label


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox as the envelope names it.

    ``local`` is the local part in its unquoted form (``john smith`` for ``"john smith"@x``), case
    kept. ``domain`` is lowercased ASCII, an address literal in brackets (``[192.0.2.1]``), or, with
    SMTPUTF8, a lowercased NFC U-label domain. Both are empty for the null reverse path ``<>``;
    ``domain`` alone is empty for the bare ``<Postmaster>`` recipient (RFC 5321 4.5.1).
    """

    local: str
    domain: str

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    def __str__(self) -> str:
        return format_address(self)


class AddressError(ValueError):
    """A path that cannot be accepted, with the parts of the reply that refuses it.

    ``status`` is the enhanced code, or ``None`` for a syntax error, where the caller picks
    X.1.7 (sender) or X.1.3 (recipient).
    """

    def __init__(self, text: str, *, code: int = 501, status: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.status = status


_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"  # RFC 5322 3.2.3 atext, as RFC 5321 4.1.2 uses it
_UTF8 = "\u00a0-\U0010ffff"  # RFC 6531 3.3 UTF8-non-ascii (C1 controls left out)
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*")
# Quoted-string content: qtextSMTP (%d32-33 / %d35-91 / %d93-126) or quoted-pairSMTP ("\" %d32-126)
_QUOTED = re.compile(r'"((?:[ !#-\[\]-~]|\\[ -~])*)"')
_QUOTED_UTF8 = re.compile(rf'"((?:[ !#-\[\]-~{_UTF8}]|\\[ -~])*)"')
_UNQUOTE = re.compile(r"\\(.)")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")

_NULL = Address("", "")
_POSTMASTER = Address("Postmaster", "")


def _syntax(text: str) -> AddressError:
    return AddressError(text)


def split_path(text: str) -> tuple[str, str]:
    """Split ``<path> PARAMS`` after ``FROM:``/``TO:`` into the path and what follows it.

    Spaces before the path are skipped (``MAIL FROM: <a@b>``, which many clients send). A ``>``
    inside a quoted local part does not end the path.
    """
    text = text.lstrip(" ")
    if not text.startswith("<"):
        space = text.find(" ")
        return (text, "") if space < 0 else (text[:space], text[space:])
    if '"' not in text:
        end = text.find(">")
    else:
        end, quoted, i = -1, False, 1
        while i < len(text):
            char = text[i]
            if quoted and char == "\\":
                i += 1
            elif char == '"':
                quoted = not quoted
            elif char == ">" and not quoted:
                end = i
                break
            i += 1
    if end < 0:
        raise _syntax("Missing '>' after the address")
    return text[: end + 1], text[end + 1 :]


def parse_path(text: str, *, utf8: bool) -> Address:
    """Parse an RFC 5321 Path, ``<>`` or ``<Postmaster>`` (see the module docstring)."""
    if not utf8 and not text.isascii():
        raise AddressError("Non-ASCII address requires SMTPUTF8", code=553, status="5.6.7")
    if len(text.encode("utf-8")) > PATH:
        raise _syntax("Path too long")
    if text.startswith("<"):
        if not text.endswith(">") or len(text) < 2:
            raise _syntax("Missing '>' after the address")
        inner = text[1:-1]
        if not inner:
            return _NULL
    else:
        inner = text
        if not inner or " " in inner or ">" in inner:
            raise _syntax("Bad address syntax")
    if inner.startswith("@"):  # A-d-l ":" (RFC 5321 4.1.2), dropped (4.1.1.3, appendix C)
        route, colon, inner = inner.partition(":")
        if not colon:
            raise _syntax("Bad source route")
        for hop in route.split(","):
            if not hop.startswith("@") or hop.startswith("@["):
                raise _syntax("Bad source route")
            _domain(hop[1:], utf8)
    if inner.lower() == "postmaster":
        return _POSTMASTER
    local, domain = _split_mailbox(inner, utf8)
    if len(local[1].encode("utf-8")) > LOCAL_PART:
        raise _syntax("Local part too long")
    return Address(local[0], _domain(domain, utf8))


def _split_mailbox(text: str, utf8: bool) -> tuple[tuple[str, str], str]:
    """``((local, local as written), domain as written)`` of ``Local-part "@" Domain``."""
    if text.startswith('"'):
        match = (_QUOTED_UTF8 if utf8 else _QUOTED).match(text)
        if match is None or text[match.end() : match.end() + 1] != "@":
            raise _syntax("Bad quoted local part")
        written = match.group(0)
        local = _UNQUOTE.sub(r"\1", match.group(1))
        return (local, written), text[match.end() + 1 :]
    local, at, domain = text.partition("@")
    if not at:
        raise _syntax("Address needs a domain")
    if (_DOT_STRING_UTF8 if utf8 else _DOT_STRING).fullmatch(local) is None:
        raise _syntax("Bad local part")
    return (local, local), domain


def _domain(text: str, utf8: bool) -> str:
    """The domain or address literal, normalised (lowercase, NFC, canonical IP text)."""
    if text.startswith("["):
        return _literal(text)
    if not text or len(text.encode("utf-8")) > DOMAIN:
        raise _syntax("Bad domain")
    labels = text.split(".")
    for i, label in enumerate(labels):
        if label.isascii():
            if len(label) > LABEL or _LDH_LABEL.fullmatch(label) is None:
                raise _syntax("Bad domain")
            labels[i] = label.lower()
        elif utf8:
            labels[i] = _u_label(label)
        else:  # parse_path refused non-ASCII already; kept for direct callers
            raise AddressError("Non-ASCII address requires SMTPUTF8", code=553, status="5.6.7")
    return ".".join(labels)


def _u_label(label: str) -> str:
    """A non-ASCII label (RFC 6531 3.3 U-label), NFC and lowercased, loosely checked.

    Letters, marks, digits and hyphens only, not at either end with a hyphen, and short enough
    that its A-label fits in 63 octets. The full IDNA2008 tables are not applied.
    """
    label = unicodedata.normalize("NFC", label).lower()
    if label.startswith("-") or label.endswith("-"):
        raise _syntax("Bad domain")
    for char in label:
        if char == "-" or (char.isascii() and char.isalnum()):
            continue
        if char.isascii() or unicodedata.category(char)[0] not in "LMN":
            raise _syntax("Bad domain")
    if len(label.encode("punycode")) + 4 > LABEL:
        raise _syntax("Bad domain")
    return label


def _literal(text: str) -> str:
    """``[IPv4]`` or ``[IPv6:...]`` (RFC 5321 4.1.3); general literals have no registered tag."""
    if not text.endswith("]"):
        raise _syntax("Bad address literal")
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            if "%" in inner:
                raise ValueError(inner)
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise _syntax("Bad address literal") from None


def needs_quoting(local: str) -> bool:
    """Whether a local part must be written as a Quoted-string (it is not a Dot-string)."""
    return _DOT_STRING_UTF8.fullmatch(local) is None


def format_address(address: Address) -> str:
    """The address as it goes between angle brackets: local part quoted when it must be.

    ``""`` for the null path, ``"Postmaster"`` for the bare postmaster (no domain).
    """
    if address.is_null:
        return ""
    if not address.domain:
        return "Postmaster"
    local = address.local
    if needs_quoting(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{address.domain}"
