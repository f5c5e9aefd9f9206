"""Interop with a real Postfix (issue 4), both ways, over STARTTLS:

* postroom -> Postfix: postroom relays by MX (a dnslib zone points pf.test at 127.0.0.3, where a
  private Postfix instance listens); Postfix's virtual(8) agent delivers into its Maildir, and
  Postfix's 550 for an unknown user comes back as postroom's RFC 3464 bounce.
* Postfix -> postroom: the same kind of instance, with ``relayhost = [127.0.0.1]:PORT``, relays
  what its sendmail(1) was given to a postroom, which delivers into its Maildir; postroom's 550
  for an unknown user becomes Postfix's bounce.

The instances are run by tests/postfix_support.py (``postfix -c DIR start``, stopped in a
``finally``); the system's Postfix is never started. They need root and Postfix installed.
"""

from __future__ import annotations

import re
import smtplib
from email.message import EmailMessage, Message
from pathlib import Path

import pytest

from tests.conftest import make_server
from tests.dns_support import serve_dns
from tests.postfix_support import postfix_skip_reason, running_postfix, wait_until
from tests.relay_support import parse, relay_config

_SKIP = postfix_skip_reason()
pytestmark = [pytest.mark.interop, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

ZONE = {
    "pf.test": ["MX 10 mx.pf.test."],
    "mx.pf.test": ["A 127.0.0.3"],
}

#: A UTF-8 body (8BITMIME both ways) and a line that starts with a dot (dot-stuffing, or BDAT).
BODY = ("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        "Gr\u00fc\u00dfe aus dem Postraum.\r\n.a line with a leading dot\r\nlast line\r\n")


def recipient_status(notice: EmailMessage) -> tuple[Message, Message]:
    """A one-recipient DSN's per-recipient fields and the message it returns (RFC 3464 2)."""
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    parts = notice.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    status, returned = parts[1], parts[2]
    assert isinstance(status, Message) and status.get_content_type() == "message/delivery-status"
    groups = status.get_payload()
    assert isinstance(groups, list) and len(groups) == 2  # per-message, one recipient
    assert isinstance(groups[1], Message) and isinstance(returned, Message)
    return groups[1], returned


def received(message: EmailMessage) -> tuple[str, str]:
    """The first two Received headers: the last hop's, then the one before."""
    first, second, *_ = message.get_all("Received") or []
    return str(first), str(second)


def test_postroom_relays_to_postfix_and_bounces_its_550(tmp_path: Path) -> None:
    with running_postfix(host="127.0.0.3", mailboxes=("dave",)) as pf, serve_dns(ZONE) as dns:
        sender = make_server(tmp_path / "postroom", relay_config(dns.port, pf.port, outbound=""))
        sender.start()
        try:
            message = ("From: alice@example.com\r\nTo: dave@pf.test, nobody@pf.test\r\n"
                       "Subject: to Postfix\r\nMessage-ID: <to-postfix@example.com>\r\n"
                       + BODY).encode()
            with smtplib.SMTP("127.0.0.1", sender.port, local_hostname="c.test",
                              timeout=15) as client:
                client.sendmail("alice@example.com", ["dave@pf.test", "nobody@pf.test"], message,
                                mail_options=["BODY=8BITMIME"])
            delivered = pf.wait_log(r"(\w+): to=<dave@pf\.test>, relay=virtual, .*"
                                    r"status=sent \(delivered to maildir\)")
            pf_queue_id = delivered.group(1)
            [raw] = pf.messages("dave@pf.test")
            got = parse(raw)
            assert got["Return-Path"] == "<alice@example.com>"
            assert got["Delivered-To"] == "dave@pf.test"
            theirs, ours = received(got)
            # Postfix's trace header names our EHLO and the TLS we started with it
            assert theirs.startswith("from mx.test.example (unknown [127.0.0.1])")
            assert f"by mx.pf.test (Postfix) with ESMTPS id {pf_queue_id}" in theirs
            # ours, added when alice's message came in, travelled unchanged
            assert re.match(r"from c\.test \(.*\[127\.0\.0\.1\]\)\s+by mx\.test\.example "
                            r"\(postroom\) with ESMTP id \w+", ours), ours
            assert raw.endswith("Gr\u00fc\u00dfe aus dem Postraum.\n.a line with a leading dot\n"
                                "last line\n".encode())
            log = pf.log()
            assert re.search(rf"{pf_queue_id}: client=unknown\[127\.0\.0\.1\]", log)
            assert "TLS connection established from unknown[127.0.0.1]" in log
            # (the queue id, or NOQUEUE when no recipient was taken before this one)
            assert re.search(r"\w+: reject: RCPT from unknown\[127\.0\.0\.1\]: 550 5\.1\.1 "
                             r"<nobody@pf\.test>: Recipient address rejected: User unknown in "
                             r"virtual mailbox table; from=<alice@example\.com> "
                             r"to=<nobody@pf\.test> proto=ESMTP helo=<mx\.test\.example>", log), log
            # postroom: one line per recipient, the 250 quoting Postfix's queue id; "N bytes
            # queued" is how Postfix answers BDAT LAST (CHUNKING, RFC 3030), not DATA
            sender.wait_for(lambda: "status=bounced" in sender.log(), timeout=15)
            ours_log = sender.log()
            assert re.search(rf"to=<dave@pf\.test>, relay=mx\.pf\.test\[127\.0\.0\.3\]:{pf.port}, "
                             rf".*dsn=2\.0\.0, status=sent \(250 2\.0\.0 Ok: \d+ bytes queued as "
                             rf"{pf_queue_id}\)", ours_log), ours_log
            assert re.search(r"to=<nobody@pf\.test>, relay=mx\.pf\.test\[127\.0\.0\.3\]:\d+, .*"
                             r"dsn=5\.1\.1, status=bounced \(host mx\.pf\.test\[127\.0\.0\.3\] "
                             r"said: 550 5\.1\.1 <nobody@pf\.test>: Recipient address rejected",
                             ours_log), ours_log
            # and the bounce, RFC 3464, in alice's Maildir
            sender.wait_for(lambda: sender.messages("alice@example.com"), timeout=15)
            [notice] = [parse(m) for m in sender.messages("alice@example.com")]
            group, returned = recipient_status(notice)
            assert group["Final-Recipient"] == "rfc822; nobody@pf.test"
            assert group["Action"] == "failed" and group["Status"] == "5.1.1"
            assert group["Remote-MTA"] == "dns; mx.pf.test"
            assert group["Diagnostic-Code"] == (
                "smtp; 550 5.1.1 <nobody@pf.test>: Recipient address rejected: User unknown in "
                "virtual mailbox table")
            assert "Subject: to Postfix" in returned.as_string()
            sender.wait_for(lambda: not list((sender.data_dir / "queue/active").iterdir()))
        finally:
            sender.stop()


def test_postfix_relays_to_postroom_and_bounces_its_550(tmp_path: Path) -> None:
    receiver = make_server(tmp_path / "postroom")  # example.com: alice and bob
    receiver.start()
    try:
        with running_postfix(host="127.0.0.3", mailboxes=("dave",),
                             relayhost=f"[127.0.0.1]:{receiver.port}") as pf:
            message = ("From: dave@pf.test\r\nTo: alice@example.com, nobody@example.com\r\n"
                       "Subject: from Postfix\r\nMessage-ID: <from-postfix@pf.test>\r\n"
                       + BODY).encode()
            pf.sendmail("dave@pf.test", ["alice@example.com", "nobody@example.com"], message)
            sent = pf.wait_log(r"(\w+): to=<alice@example\.com>, relay=127\.0\.0\.1"
                               rf"\[127\.0\.0\.1\]:{receiver.port}, .*dsn=2\.0\.0, status=sent "
                               r"\(250 2\.0\.0 Ok: queued as (\w+)\)")
            pf_queue_id, our_queue_id = sent.groups()
            [raw] = receiver.messages("alice@example.com")
            got = parse(raw)
            assert got["Message-ID"] == "<from-postfix@pf.test>"
            assert got["Return-Path"] == "<dave@pf.test>"
            ours, theirs = received(got)
            # our trace header names Postfix's EHLO, its TLS, and the queue id Postfix logged
            assert re.match(r"from mx\.pf\.test \(.*\[127\.0\.0\.1\]\)\s+\(using TLSv1\.[23] "
                            rf".*\)\s+by mx\.test\.example \(postroom\) with ESMTPS id "
                            rf"{our_queue_id}\b", ours), ours
            # Postfix's own, made by pickup(8) for what sendmail(1) dropped
            assert re.match(rf"by mx\.pf\.test \(Postfix, from userid 0\)\s+id {pf_queue_id};",
                            theirs), theirs
            assert raw.endswith("Gr\u00fc\u00dfe aus dem Postraum.\n.a line with a leading dot\n"
                                "last line\n".encode())
            log = pf.log()
            assert re.search(rf"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:"
                             rf"{receiver.port}: TLSv1\.[23]", log), log
            # postroom's 550 for the unknown user: Postfix bounces it to dave, quoting us
            pf.wait_log(r"to=<nobody@example\.com>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*"
                        r"dsn=5\.1\.1, status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: "
                        r"550 5\.1\.1")
            wait_until(lambda: pf.messages("dave@pf.test"), 15,
                       lambda: f"no bounce for dave:\n{pf.log()}")
            [bounce] = [parse(m) for m in pf.messages("dave@pf.test")]
            assert bounce["From"].addresses[0].username == "MAILER-DAEMON"
            assert "nobody@example.com" in bounce.as_string()
            # postroom's log: the session with Postfix by its HELO name, and the delivery
            our_log = receiver.log()
            assert re.search(rf"{our_queue_id}: reject: RCPT from .*\[127\.0\.0\.1\]: 550 5\.1\.1 .*"
                             r"from=<dave@pf\.test> to=<nobody@example\.com> proto=ESMTP "
                             r"helo=<mx\.pf\.test>", our_log), our_log
            assert re.search(rf"{our_queue_id}: to=<alice@example\.com>, .*status=sent", our_log)
    finally:
        receiver.stop()
