"""postroom: a mail server. SMTP in (MX and submission), a durable queue, Maildir delivery.

The layout tells the architecture (see docs/architecture.md):

- ``smtp``: the sans-I/O SMTP core (bytes in, events out) and its reply codes.
- ``sasl``: sans-I/O SASL mechanisms (PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-256) for AUTH.
- ``message``: addresses (RFC 5321/6531) and the headers postroom adds.
- ``policy``: who may relay, which recipients are ours (the router).
- ``accounts``: domains, users, aliases, password hashes (SQLite).
- ``queue``: durable acceptance (group-committed fsync), the queue runner.
- ``delivery``: local Maildir delivery.
- ``net``: asyncio listeners that feed bytes to the cores; TLS (STARTTLS).
"""

__version__ = "0.1.0"
