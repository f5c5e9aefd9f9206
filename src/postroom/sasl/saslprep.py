"""SASLprep (RFC 4013) and SCRAM's saslname escaping (RFC 5802 5.1).

SASLprep is the stringprep (RFC 3454) profile that SCRAM applies to user names and passwords:

1. Map (RFC 4013 2.1): non-ASCII spaces (table C.1.2) to U+0020; the characters "commonly
   mapped to nothing" (table B.1: soft hyphen, zero-width joiners, variation selectors...) removed.
2. Normalise (2.2): Unicode NFKC, as of Unicode 3.2 (the version stringprep is defined on).
3. Prohibit (2.3): tables C.1.2, C.2.1, C.2.2, C.3, C.4, C.5, C.6, C.7, C.8 and C.9.
4. Bidirectional text (2.4, RFC 3454 6): a string with any RandALCat character (table D.1) has
   no LCat character (D.2) and begins and ends with a RandALCat character.
5. Unassigned code points (2.5, RFC 3454 7): refused in a "stored string" (a password being set),
   allowed in a "query" (a user name or password received during authentication).

The tables are the standard library's :mod:`stringprep`. A string that fails raises ValueError
with a message naming the rule, never the string.

A saslname (RFC 5802 5.1) is a SASLprep'd name with "," written "=2C" and "=" written "=3D";
any other "=" is an error.
"""

from __future__ import annotations

import stringprep
import unicodedata

_PROHIBITED = (
    stringprep.in_table_c12,  # non-ASCII space
    stringprep.in_table_c21,  # ASCII control
    stringprep.in_table_c22,  # non-ASCII control
    stringprep.in_table_c3,  # private use
    stringprep.in_table_c4,  # non-character code points
    stringprep.in_table_c5,  # surrogate codes
    stringprep.in_table_c6,  # inappropriate for plain text
    stringprep.in_table_c7,  # inappropriate for canonical representation
    stringprep.in_table_c8,  # change display properties or deprecated
    stringprep.in_table_c9,  # tagging characters
)


def saslprep(value: str, *, stored: bool = False) -> str:
    """*value* prepared by RFC 4013; ValueError when a rule refuses it.

    *stored* is True for a string being stored (a new password): unassigned code points are
    then refused too (RFC 3454 7).
    """
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in value if not stringprep.in_table_b1(ch)
    )
    normal = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if not normal:
        return normal
    for ch in normal:
        if any(prohibited(ch) for prohibited in _PROHIBITED):
            raise ValueError("SASLprep: prohibited character")
        if stored and stringprep.in_table_a1(ch):
            raise ValueError("SASLprep: unassigned code point in a stored string")
    if any(stringprep.in_table_d1(ch) for ch in normal):
        if any(stringprep.in_table_d2(ch) for ch in normal):
            raise ValueError("SASLprep: mixed right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(normal[0]) and stringprep.in_table_d1(normal[-1])):
            raise ValueError("SASLprep: right-to-left text must begin and end so")
    return normal


def decode_saslname(value: str) -> str:
    """RFC 5802 5.1 saslname to name: "=2C" is ",", "=3D" is "="; ValueError otherwise."""
    if "," in value:
        raise ValueError("saslname: unescaped ','")
    pieces = value.split("=")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if piece.startswith("2C"):
            out.append("," + piece[2:])
        elif piece.startswith("3D"):
            out.append("=" + piece[2:])
        else:
            raise ValueError("saslname: '=' not followed by 2C or 3D")
    return "".join(out)


def encode_saslname(name: str) -> str:
    """Name to RFC 5802 saslname ("=" first, so the "=" of "=2C" is not escaped again)."""
    return name.replace("=", "=3D").replace(",", "=2C")
