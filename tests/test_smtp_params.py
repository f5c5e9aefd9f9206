"""MAIL/RCPT parameters: SIZE, BODY, SMTPUTF8, RET, ENVID, NOTIFY, ORCPT and xtext."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.smtp.params import (
    MailParams,
    ParamError,
    RcptParams,
    decode_xtext,
    parse_mail_params,
    parse_rcpt_params,
    split_params,
)


def test_split_params() -> None:
    assert split_params("") == {}
    assert split_params(" size=10  Body=7bit SMTPUTF8") == {
        "SIZE": "10", "BODY": "7bit", "SMTPUTF8": None,
    }


@pytest.mark.parametrize("text", ["=x", "-A=1", "A=", "A=b=c", "A=b\x01", "SIZE=1 size=2"])
def test_split_params_refuses_bad_syntax(text: str) -> None:
    with pytest.raises(ParamError) as info:
        split_params(text)
    assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.5.4")


def test_mail_params() -> None:
    assert parse_mail_params("") == MailParams()
    assert parse_mail_params(
        " SIZE=0 BODY=7bit SMTPUTF8 RET=Full ENVID=a+2Bb+3Dc"
    ) == MailParams(size=0, body="7BIT", smtputf8=True, ret="FULL", envid="a+b=c")
    assert parse_mail_params(" SIZE=" + "9" * 20).size == 10**20 - 1


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (" SIZE", 501), (" SIZE=" + "9" * 21, 501), (" SIZE=-1", 501), (" SIZE=１", 501),
        (" BODY=8BIT", 501), (" BODY=BINARYMIME", 504), (" RET=", 501), (" RET=NONE", 501),
        (" ENVID=" + "e" * 101, 501), (" ENVID=a+2", 501), (" ENVID", 501),
        (" SMTPUTF8=1", 501), (" AUTH=<>", 504), (" X-FOO", 555), (" NOTIFY=NEVER", 555),
    ],
)
def test_mail_param_refusals(text: str, code: int) -> None:
    with pytest.raises(ParamError) as info:
        parse_mail_params(text)
    assert (info.value.reply.code, info.value.reply.enhanced) == (code, "5.5.4")


def test_rcpt_params() -> None:
    assert parse_rcpt_params("") == RcptParams()
    assert parse_rcpt_params(" notify=Failure,delay,FAILURE ORCPT=rfc822;a+40b") == RcptParams(
        notify=frozenset({"FAILURE", "DELAY"}), orcpt="rfc822;a@b"
    )
    assert parse_rcpt_params(" NOTIFY=never").notify == frozenset({"NEVER"})
    assert parse_rcpt_params(" ORCPT=" + "rfc822;" + "o" * 493).orcpt is not None


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (" NOTIFY=NEVER,DELAY", 501), (" NOTIFY=SOMETIMES", 501), (" NOTIFY=SUCCESS,", 501),
        (" NOTIFY", 501), (" ORCPT=rfc822", 501), (" ORCPT=;a@b", 501), (" ORCPT=rfc822;", 501),
        (" ORCPT=rfc822;a+zzb", 501), (" ORCPT=rfc822;" + "o" * 494, 501),
        (" SIZE=1", 555), (" RET=FULL", 555),
    ],
)
def test_rcpt_param_refusals(text: str, code: int) -> None:
    with pytest.raises(ParamError) as info:
        parse_rcpt_params(text)
    assert (info.value.reply.code, info.value.reply.enhanced) == (code, "5.5.4")


def test_xtext() -> None:
    assert decode_xtext("") == ""
    assert decode_xtext("plain") == "plain"
    assert decode_xtext("a+2Bb+20c+3D") == "a+b c="
    assert decode_xtext("+2b") == "+"  # lowercase hex tolerated
    for bad in ("+", "+2", "+GG", "a b", "a=b", "é"):
        with pytest.raises(ParamError):
            decode_xtext(bad)


def _encode_xtext(text: str) -> str:
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}"
                   for c in text)


@settings(max_examples=200)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40))
def test_xtext_round_trip(text: str) -> None:
    assert decode_xtext(_encode_xtext(text)) == text


def test_xtext_may_not_decode_to_controls() -> None:
    import pytest as _pytest

    from postroom.smtp.params import ParamError

    assert decode_xtext("a+2Bb") == "a+b"
    for bad in ("x+0D+0AInjected:+20yes", "x+00", "x+7F"):
        with _pytest.raises(ParamError) as info:
            decode_xtext(bad)
        assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.5.4")
