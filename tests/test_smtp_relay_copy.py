"""A relayed copy is dot-stuffed so that the next hop sees exactly the message we stored.

Every smuggling variant goes through the server core; what it stores is encoded again for DATA
(as the relay will send it) and decoded by a second server core: the content must come out
byte-identical, with one end of data, at the end.
"""

from __future__ import annotations

import pytest

from postroom.smtp.data import DataDecoder, encode_data

VARIANTS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r\n..\r\n", b".\r\n",
            b"\r\n. \r\n", b"\r\n.x\r\n"]


def decode(wire: bytes) -> tuple[bytes, bytes | None]:
    decoder = DataDecoder(max_size=10_000_000, max_line_length=65536, reject_bare_lf=False)
    content, rest = decoder.feed(wire)
    assert decoder.error is None
    return bytes(content), rest


@pytest.mark.parametrize("variant", VARIANTS)
def test_stored_content_survives_the_next_hop(variant: bytes) -> None:
    body = b"Subject: s\r\n\r\n" + b".first\r\nmid" + variant + b"MAIL FROM:<x@y>\r\ntail\r\n"
    stored, rest = decode(body + b".\r\nQUIT\r\n")
    assert rest == b"QUIT\r\n"
    wire = encode_data(stored)
    assert wire.endswith(b"\r\n.\r\n") and wire.count(b"\r\n.\r\n") == 1
    again, rest = decode(wire + b"NEXT\r\n")
    assert again == stored
    assert rest == b"NEXT\r\n"


def test_encode_adds_missing_line_end_and_stuffs_first_line() -> None:
    assert encode_data(b".a\r\nb") == b"..a\r\nb\r\n.\r\n"
    assert encode_data(b"") == b".\r\n"
