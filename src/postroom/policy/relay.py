"""May this client relay? Trusted networks, as Postfix's ``mynetworks``.

Only a client whose address lies in ``relay.trusted_networks`` may send mail to domains that are
not ours (authenticated submission arrives separately). The default, an empty list, trusts nobody,
not even loopback. An IPv4 client seen on a dual-stack socket as ``::ffff:192.0.2.1`` (RFC 4291
2.5.5.2) is matched as ``192.0.2.1``, so a v4 network trusts it.
"""

from __future__ import annotations

import ipaddress

from postroom.config import RelaySection


def may_relay(client_ip: str, relay: RelaySection) -> bool:
    """True when *client_ip* lies in one of the trusted networks. Unparsable input is False."""
    text = client_ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            address = ipaddress.IPv6Address(text.partition("%")[0])
            candidates = [address]
        if address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
    for network in relay.networks():
        for candidate in candidates:
            if candidate.version == network.version and candidate in network:
                return True
    return False
