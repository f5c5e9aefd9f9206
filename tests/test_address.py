"""RFC 5321 paths (with RFC 6531 SMTPUTF8): parse_path, split_path, format_address."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.message.address import (
    LOCAL_PART,
    PATH,
    Address,
    AddressError,
    format_address,
    parse_path,
    split_path,
)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("<john@example.com>", Address("john", "example.com")),
        ("<John.Smith@Example.COM>", Address("John.Smith", "example.com")),  # local case kept
        ("john@example.com", Address("john", "example.com")),  # no brackets, no spaces
        ("<a+tag@sub.example.org>", Address("a+tag", "sub.example.org")),
        ("<!#$%&'*+-/=?^_`{|}~@x.example>", Address("!#$%&'*+-/=?^_`{|}~", "x.example")),
        ('<"john smith"@example.com>', Address("john smith", "example.com")),
        ('<"a\\"b\\\\c"@example.com>', Address('a"b\\c', "example.com")),
        ('<"a@b>c"@example.com>', Address("a@b>c", "example.com")),
        ('<"plain"@example.com>', Address("plain", "example.com")),
        ('<""@example.com>', Address("", "example.com")),
        ("<u@[192.0.2.1]>", Address("u", "[192.0.2.1]")),
        ("<u@[IPv6:2001:DB8:0:0::1]>", Address("u", "[IPv6:2001:db8::1]")),
        ("<u@[ipv6:::1]>", Address("u", "[IPv6:::1]")),
        ("<@a.example,@b.example:u@d.example>", Address("u", "d.example")),
        ("<@a.example:u@d.example>", Address("u", "d.example")),
        ("<xn--bcher-kva.example@xn--bcher-kva.example>",
         Address("xn--bcher-kva.example", "xn--bcher-kva.example")),
        ("<>", Address("", "")),
        ("<Postmaster>", Address("Postmaster", "")),
        ("<pOSTMASTER>", Address("Postmaster", "")),
        ("<postmaster@Example.com>", Address("postmaster", "example.com")),
        ("<a@1.2.3.4>", Address("a", "1.2.3.4")),  # a domain that looks like an address
    ],
)
def test_parse_ascii(text: str, address: Address) -> None:
    assert parse_path(text, utf8=False) == address
    assert parse_path(text, utf8=True) == address


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("<jöran@bücher.example>", Address("jöran", "bücher.example")),
        ("<用户@例子.广告>", Address("用户", "例子.广告")),
        ("<u@BÜCHER.example>", Address("u", "bücher.example")),
        ("<u@bu\u0308cher.example>", Address("u", "bücher.example")),  # NFC
        ('<"jö ran"@x.example>', Address("jö ran", "x.example")),
    ],
)
def test_parse_utf8(text: str, address: Address) -> None:
    assert parse_path(text, utf8=True) == address
    with pytest.raises(AddressError) as info:
        parse_path(text, utf8=False)
    assert (info.value.code, info.value.status) == (553, "5.6.7")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<",
        "<a@b.example",
        "a b@c.example",
        "<a b@c.example>",
        "<a@b.example> ",
        "<.a@b.example>",
        "<a.@b.example>",
        "<a..b@c.example>",
        "<a@>",
        "<@b.example>",
        "<a>",
        "<a@b..example>",
        "<a@b.example.>",
        "<a@-b.example>",
        "<a@b-.example>",
        "<a@b_c.example>",
        "<a@" + "l" * 64 + ".example>",
        '<"a"b@c.example>',
        '<"a@c.example>',
        '<"a\tb"@c.example>',
        "<a\x00b@c.example>",
        "<a@[300.1.1.1]>",
        "<a@[1.2.3]>",
        "<a@[IPv6:1.2.3.4]>",
        "<a@[IPv6:fe80::1%eth0]>",
        "<a@[tag:whatever]>",
        "<a@[1.2.3.4>",
        "<@a.example u@d.example>",
        "<@a.example,b.example:u@d.example>",
        "<@[1.2.3.4]:u@d.example>",
        "<@a..example:u@d.example>",
        "<a@b@c.example>",
    ],
)
def test_syntax_errors_are_501_for_the_caller_to_qualify(text: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(text, utf8=True)
    assert info.value.code == 501
    assert info.value.status is None  # X.1.7 for a sender, X.1.3 for a recipient
    assert isinstance(info.value, ValueError)


def test_non_ascii_label_rules() -> None:
    for bad in ("<u@bü_cher.example>", "<u@-bücher.example>", "<u@bü cher.example>",
                "<u@" + "ü" * 60 + ".example>"):
        with pytest.raises(AddressError):
            parse_path(bad, utf8=True)


def test_length_limits() -> None:
    local = "l" * LOCAL_PART
    assert parse_path(f"<{local}@x.example>", utf8=False).local == local
    with pytest.raises(AddressError, match="Local part too long"):
        parse_path(f"<{local}l@x.example>", utf8=False)
    with pytest.raises(AddressError, match="Local part too long"):  # octets, not characters
        parse_path(f"<{'é' * 33}@x.example>", utf8=True)
    domain = ".".join(["d" * 59] * 3) + ".example"  # 187 octets
    path = f"<{local}@{domain}>"
    assert len(path) == 254
    assert parse_path(path, utf8=False).domain == domain
    with pytest.raises(AddressError, match="Path too long"):
        parse_path(f"<{local}@ddd{domain}>", utf8=False)  # 257 octets
    assert PATH == 256


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (Address("john", "example.com"), "john@example.com"),
        (Address("john smith", "example.com"), '"john smith"@example.com'),
        (Address('a"b\\c', "x.example"), '"a\\"b\\\\c"@x.example'),
        (Address("a..b", "x.example"), '"a..b"@x.example'),
        (Address("", "x.example"), '""@x.example'),
        (Address("jöran", "bücher.example"), "jöran@bücher.example"),
        (Address("", ""), ""),
        (Address("Postmaster", ""), "Postmaster"),
        (Address("u", "[192.0.2.1]"), "u@[192.0.2.1]"),
    ],
)
def test_format_and_str(address: Address, text: str) -> None:
    assert format_address(address) == text
    assert str(address) == text


def test_split_path() -> None:
    assert split_path("<a@b.example> SIZE=1") == ("<a@b.example>", " SIZE=1")
    assert split_path(" <a@b.example>") == ("<a@b.example>", "")
    assert split_path("a@b.example BODY=7BIT") == ("a@b.example", " BODY=7BIT")
    assert split_path('<"x>y"@b.example> RET=FULL') == ('<"x>y"@b.example>', " RET=FULL")
    assert split_path('<"x\\">y"@b.example>') == ('<"x\\">y"@b.example>', "")
    assert split_path("<>") == ("<>", "")
    with pytest.raises(AddressError):
        split_path("<a@b.example")


_atom = st.text(alphabet="abcxyz019!#$%&'*+-/=?^_`{|}~", min_size=1, max_size=8)
_local = st.one_of(
    st.lists(_atom, min_size=1, max_size=3).map(".".join),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)


@settings(max_examples=200)
@given(_local, _domain)
def test_format_then_parse_round_trips(local: str, domain: str) -> None:
    address = Address(local, domain)
    assert parse_path(f"<{format_address(address)}>", utf8=False) == address


@settings(max_examples=200)
@given(st.text(max_size=80))
def test_parse_never_fails_other_than_address_error(text: str) -> None:
    try:
        address = parse_path(text, utf8=True)
    except AddressError as exc:
        assert exc.code in (501, 553)
    else:
        assert isinstance(address, Address)
