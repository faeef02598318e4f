"""A weak proxy for the ipv6-form family: its classifier misses one IPv4 embedding.

The table has every row, but the well-known NAT64 prefix 64:ff9b::/96 (RFC 6052 §2.1) is judged as
ordinary global unicast: neither denied as a translator wrapper nor unwrapped, so
``[64:ff9b::7f00:1]`` (127.0.0.1 behind any NAT64 gateway) and ``[64:ff9b::169.254.169.254]`` are
dialled. IPv4-mapped, IPv4-compatible, SIIT, 6to4 and Teredo are unwrapped as the reference does.
"""

from __future__ import annotations

import ipaddress

from pytest_sandbox.network.addresses import AddressVerdict, classify_address

MISSED_EMBEDDING = ipaddress.ip_network("64:ff9b::/96")


def classify_missing_nat64(address: str) -> AddressVerdict:
    parsed = ipaddress.ip_address(address)
    if parsed.version == 6 and parsed in MISSED_EMBEDDING:
        return AddressVerdict(address, False, f"public (weakened: {MISSED_EMBEDDING} not unwrapped)", None)
    return classify_address(address)
