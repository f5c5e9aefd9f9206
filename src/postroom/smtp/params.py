"""The arguments of MAIL FROM and RCPT TO: the path and the parameters (RFC 5321 4.1.1.2-3, 4.1.2).

:func:`mail_from` and :func:`rcpt_to` turn an argument into the event the server reports, or raise
:class:`ParamError` with the reply that refuses it. The path is read by
:func:`postroom.message.address.parse_path`; a bad path gets 501 with X.1.7 for a sender and X.1.3
for a recipient (RFC 3463 3.2), a non-ASCII one without SMTPUTF8 553 5.6.7 (RFC 6531 3.5).
Like Postfix, a space may follow the colon (``MAIL FROM: <a@b>``). Parameters exist only after
EHLO (RFC 5321 4.1.1.11, RFC 1869): after HELO they get 555 5.5.4.

Parameters understood:

- MAIL: ``SIZE=n`` (RFC 1870 3), ``BODY=7BIT|8BITMIME`` (RFC 6152 2), ``SMTPUTF8`` (RFC 6531
  3.4), ``RET=FULL|HDRS`` and ``ENVID=xtext`` (RFC 3461 4.3, 4.4).
- RCPT: ``NOTIFY=NEVER|SUCCESS,FAILURE,DELAY`` and ``ORCPT=addr-type;xtext`` (RFC 3461 4.1, 4.2).

A keyword that is not ours gets 555 5.5.4 (RFC 5321 4.1.1.11); a keyword we know but whose
extension we do not offer (``BODY=BINARYMIME``, ``AUTH=``) gets 504 5.5.4; a bad value, a value
missing or a keyword given twice gets 501 5.5.4. Keywords and the enumerated values are
case-insensitive (RFC 5321 2.4); the values are returned in upper case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from postroom.message.address import AddressError, parse_path, split_path
from postroom.smtp.codes import MESSAGE_TOO_BIG, PARAM_NOT_IMPLEMENTED, PARAM_UNRECOGNIZED, Reply
from postroom.smtp.events import MailFrom, RcptTo

ENVID_MAX: Final = 100  # RFC 3461 4.4: ENVID at most 100 characters
ORCPT_MAX: Final = 500  # RFC 3461 4.2: ORCPT at most 500 characters
AUTH_PARAM_MAX: Final = 500  # RFC 4954 5: AUTH= adds at most 500 characters to MAIL
SIZE_DIGITS: Final = 20  # RFC 1870 3: size-value ::= 1*20DIGIT

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # RFC 5321 4.1.2 esmtp-keyword
# esmtp-value: %d33-60 / %d62-126, plus UTF8-non-ascii with SMTPUTF8 (RFC 6531 3.3)
_VALUE = re.compile(r"[!-<>-~\u0080-\U0010ffff]+")
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})*")  # RFC 3461 4: xchar / hexchar
_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")  # RFC 3461 4.2 atom

_NOTIFY_WORDS: Final = frozenset({"SUCCESS", "FAILURE", "DELAY"})
#: Parameters of extensions we know of but do not offer (yet): 504, not 555.
_NOT_OFFERED: Final = frozenset({"AUTH", "MT-PRIORITY", "REQUIRETLS", "HOLDFOR", "HOLDUNTIL"})


class ParamError(Exception):
    """A parameter cannot be accepted; ``reply`` is the answer to the command."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class MailParams:
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True, slots=True)
class RcptParams:
    notify: frozenset[str] | None = None
    orcpt: str | None = None


def _bad(text: str) -> ParamError:
    return ParamError(Reply(501, "5.5.4", text))


def split_params(text: str) -> dict[str, str | None]:
    """``KEY=value KEY2`` -> ``{"KEY": "value", "KEY2": None}``, keywords upper-cased."""
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue  # several spaces between parameters: be lenient
        keyword, eq, value = item.partition("=")
        if _KEYWORD.fullmatch(keyword) is None:
            raise _bad(f"Bad parameter syntax: {item[:40]}")
        if eq and _VALUE.fullmatch(value) is None:
            raise _bad(f"Bad parameter value: {item[:40]}")
        keyword = keyword.upper()
        if keyword in params:
            raise _bad(f"Duplicate parameter {keyword}")
        params[keyword] = value if eq else None
    return params


def decode_xtext(text: str) -> str:
    """RFC 3461 4: ``+XX`` is the octet XX. Lowercase hex digits are tolerated."""
    if _XTEXT.fullmatch(text) is None:
        raise _bad("Bad xtext")
    if "+" not in text:
        return text
    decoded = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)
    # RFC 3461 4: xtext carries printable US-ASCII; a control decoded from "+0D" or "+00"
    # would reach a DSN's header fields (Original-Recipient, Original-Envelope-Id).
    if any(not 0x20 <= ord(c) < 0x7F for c in decoded):
        raise _bad("Bad xtext: control or non-ASCII character")
    return decoded


def _unknown(keyword: str) -> ParamError:
    reply = PARAM_NOT_IMPLEMENTED if keyword in _NOT_OFFERED else PARAM_UNRECOGNIZED
    return ParamError(Reply(reply.code, reply.enhanced, f"{reply.text}: {keyword}"))


def _need(keyword: str, value: str | None) -> str:
    if value is None:
        raise _bad(f"{keyword} needs a value")
    return value


def parse_mail_params(text: str, *, auth: bool = False) -> MailParams:
    """MAIL's parameters; ``auth`` when the session offers AUTH, which brings RFC 4954 5's
    ``AUTH=<mailbox>`` parameter (xtext). We do not trust another server's claim about who
    submitted a message, so its value is checked and then treated as ``AUTH=<>``."""
    size = body = ret = envid = None
    smtputf8 = False
    for keyword, value in split_params(text).items():
        if keyword == "AUTH" and auth:
            raw = _need(keyword, value)
            if len(raw) > AUTH_PARAM_MAX:
                raise _bad("AUTH parameter too long")
            if raw != "<>":
                decode_xtext(raw)
            continue
        if keyword == "SIZE":
            value = _need(keyword, value)
            if not value.isascii() or not value.isdigit() or len(value) > SIZE_DIGITS:
                raise _bad("Bad SIZE value")
            size = int(value)
        elif keyword == "BODY":
            body = _need(keyword, value).upper()
            if body == "BINARYMIME":  # RFC 3030 3: needs the BINARYMIME extension we lack
                raise ParamError(Reply(504, "5.5.4", "BODY=BINARYMIME is not supported"))
            if body not in ("7BIT", "8BITMIME"):
                raise _bad("Bad BODY value")
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise _bad("SMTPUTF8 takes no value")
            smtputf8 = True
        elif keyword == "RET":
            ret = _need(keyword, value).upper()
            if ret not in ("FULL", "HDRS"):
                raise _bad("Bad RET value")
        elif keyword == "ENVID":
            raw = _need(keyword, value)
            if len(raw) > ENVID_MAX:
                raise _bad("ENVID too long")
            envid = decode_xtext(raw)
        else:
            raise _unknown(keyword)
    return MailParams(size=size, body=body, smtputf8=smtputf8, ret=ret, envid=envid)


def parse_rcpt_params(text: str) -> RcptParams:
    notify: frozenset[str] | None = None
    orcpt = None
    for keyword, value in split_params(text).items():
        if keyword == "NOTIFY":
            words = frozenset(_need(keyword, value).upper().split(","))
            if words != {"NEVER"} and not (words and words <= _NOTIFY_WORDS):
                raise _bad("Bad NOTIFY value")  # NEVER stands alone (RFC 3461 4.1)
            notify = words
        elif keyword == "ORCPT":
            raw = _need(keyword, value)
            if len(raw) > ORCPT_MAX:
                raise _bad("ORCPT too long")
            addr_type, semi, address = raw.partition(";")
            if not semi or not address or _ADDR_TYPE.fullmatch(addr_type) is None:
                raise _bad("Bad ORCPT value")
            orcpt = f"{addr_type};{decode_xtext(address)}"
        else:
            raise _unknown(keyword)
    return RcptParams(notify=notify, orcpt=orcpt)


def _split(arg: str, keyword: str, role: str) -> tuple[str, str]:
    """``FROM:<path> params`` -> (path, params)."""
    arg = arg.lstrip(" ")
    if arg[: len(keyword)].upper() != keyword:
        raise ParamError(Reply(501, "5.5.4", f"Syntax: {role} {keyword}<address>"))
    path, rest = split_path(arg[len(keyword) :])
    if rest and not rest.startswith(" "):
        raise AddressError("Bad address syntax")
    return path, rest


def _address_error(exc: AddressError, status: str) -> ParamError:
    return ParamError(Reply(exc.code, exc.status or status, exc.text))


_AFTER_HELO: Final = Reply(555, "5.5.4", "Error: parameters need EHLO")


def mail_from(arg: str, *, esmtp: bool, max_size: int, auth: bool = False) -> MailFrom:
    """The argument of MAIL (after ``MAIL``); SIZE over ``max_size`` (if > 0) gets 552 5.3.4.
    ``auth``: the session offers AUTH, so ``AUTH=`` is a known parameter (RFC 4954 5)."""
    try:
        path, rest = _split(arg, "FROM:", "MAIL")
        if rest.strip() and not esmtp:
            raise ParamError(_AFTER_HELO)
        params = parse_mail_params(rest, auth=auth)
        if params.size is not None and 0 < max_size < params.size:
            raise ParamError(MESSAGE_TOO_BIG)  # RFC 1870 6.1
        address = parse_path(path, utf8=params.smtputf8)
        if address.local and not address.domain:  # <Postmaster> names a recipient only
            raise AddressError("Sender address needs a domain")
    except AddressError as exc:
        raise _address_error(exc, "5.1.7") from None
    return MailFrom(address, params.size, params.body, params.smtputf8, params.ret, params.envid)


def rcpt_to(arg: str, *, esmtp: bool, utf8: bool) -> RcptTo:
    """The argument of RCPT (after ``RCPT``); ``utf8`` when MAIL carried SMTPUTF8."""
    try:
        path, rest = _split(arg, "TO:", "RCPT")
        if rest.strip() and not esmtp:
            raise ParamError(_AFTER_HELO)
        params = parse_rcpt_params(rest)
        address = parse_path(path, utf8=utf8)
        if address.is_null:
            raise AddressError("Recipient address needs a mailbox")
    except AddressError as exc:
        raise _address_error(exc, "5.1.3") from None
    return RcptTo(address, params.notify, params.orcpt, not address.domain)
