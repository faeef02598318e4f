"""A weak proxy for the special-use-range family: one row of the table is missing.

Its classifier is the reference's table without fc00::/7 (RFC 4193 unique local addresses), the row
many hand-written deny lists forget and the one the AWS IPv6 metadata endpoint (fd00:ec2::254) lives
in; everything else is the reference proxy. A classify function handed to ProxyConfig, as the
reference's own table check is.
"""

from __future__ import annotations

import ipaddress

from pytest_sandbox.network.addresses import AddressVerdict, classify_address

MISSING_ROW = ipaddress.ip_network("fc00::/7")


def classify_without_unique_local(address: str) -> AddressVerdict:
    parsed = ipaddress.ip_address(address)
    if parsed.version == 6 and parsed in MISSING_ROW:
        return AddressVerdict(address, False, f"public (weakened: no {MISSING_ROW} row)", None)
    return classify_address(address)
