"""Weak proxies for the ipv6-form family: one IPv4-carrying IPv6 form handled wrongly each.

Each is a ``classify`` handed to ProxyConfig (as the reference's own table check is), identical to the
reference classifier everywhere but the one form its mistake names (network.md section 1.4):

* **unknown wrapper** (:func:`classify_unknown_wrapper`): the classifier has no row for a wrapper
  prefix and does not unwrap it, so the prefix is judged as ordinary IPv6: public. OpenShell's
  ``is_internal_ip`` at PR #819 missed exactly these (network.md section 1.5): 6to4 2002::/16 (RFC 3056),
  IPv4-compatible ::/96 (RFC 4291 §2.5.5.1, missed because ``to_ipv4_mapped`` is used, not ``to_ipv4``),
  SIIT ::ffff:0:0:0/96 (RFC 2765) and the local-use NAT64 prefix 64:ff9b:1::/48 (RFC 8215). The more
  specific rows inside a prefix (``::`` and ``::1`` inside ::/96) keep their own checks.
* **Teredo client read without the XOR** (:func:`classify_teredo_without_xor`): a hand-written Teredo
  unwrap that judges the server (bits 32-63) and the client, but reads the client as the raw low 32
  bits, forgetting that RFC 4380 §4 stores it obfuscated (bitwise NOT). Like most hand-written unwraps
  it judges the wrapper by what it carries (the reference denies 2001::/32 outright), which is what lets
  the misread client through.
* **IPv4-mapped against a short list** (:func:`classify_mapped_short_list`): plain IPv4 is judged by the
  whole table, but the IPv4-mapped path checks the unwrapped address against OpenShell #819's
  ``is_internal_ip`` list (network.md section 1.5): 192.0.2.0/24, 240.0.0.0/4, AS112 and the rest leak
  through ``::ffff:a.b.c.d``.
* **wrappers judged by what they carry** (:func:`classify_wrappers_by_content`): every wrapper is
  unwrapped and judged correctly, but a wrapper carrying a public IPv4 is allowed, as IPv4-mapped is,
  although it reaches IPv4 through a translator or relay the sandbox does not control.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from pytest_sandbox.network.addresses import AddressVerdict, classify_address, load_special_use_table

Classify = Callable[[str], AddressVerdict]

SIXTOFOUR = ipaddress.IPv6Network("2002::/16")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
TEREDO = ipaddress.IPv6Network("2001::/32")
IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

# OpenShell's is_internal_ip at PR #819 plus its always-blocked 0.0.0.0 (network.md section 1.5).
SHORT_LIST: tuple[ipaddress.IPv4Network, ...] = tuple(map(ipaddress.IPv4Network, (
    "0.0.0.0/32", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24")))
_LOW_32 = 0xFFFF_FFFF


def _public(address: str, why: str) -> AddressVerdict:
    return AddressVerdict(address, False, f"public (weakened: {why})", None)


def _nested_rows(network: ipaddress.IPv6Network) -> tuple[ipaddress.IPv6Network, ...]:
    return tuple(row.network for row in load_special_use_table()
                 if isinstance(row.network, ipaddress.IPv6Network) and row.network.prefixlen > network.prefixlen
                 and row.network.subnet_of(network))


def classify_unknown_wrapper(network: ipaddress.IPv6Network) -> Classify:
    """The reference classifier without ``network``'s row and unwrapping: its addresses are public."""
    nested = _nested_rows(network)

    def classify(address: str) -> AddressVerdict:
        parsed = ipaddress.ip_address(address)
        if (isinstance(parsed, ipaddress.IPv6Address) and parsed in network
                and not any(parsed in row for row in nested)):
            return _public(address, f"{network} not known as an IPv4 wrapper")
        return classify_address(address)

    classify.__name__ = f"classify_unknown_{network}"
    return classify


def classify_teredo_without_xor(address: str) -> AddressVerdict:
    parsed = ipaddress.ip_address(address)
    if not (isinstance(parsed, ipaddress.IPv6Address) and parsed in TEREDO):
        return classify_address(address)
    server = ipaddress.IPv4Address((int(parsed) >> 64) & _LOW_32)
    client = ipaddress.IPv4Address(int(parsed) & _LOW_32)  # the mistake: RFC 4380 §4 says NOT these bits
    for role, carried in (("server", server), ("client", client)):
        verdict = classify_address(carried)
        if verdict.denied:
            return AddressVerdict(address, True, f"Teredo {role} {carried}: {verdict.reason}", verdict.range)
    return _public(address, f"Teredo carrying public server {server} and client {client} (client not de-obfuscated)")


def classify_mapped_short_list(address: str) -> AddressVerdict:
    parsed = ipaddress.ip_address(address)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        ipv4 = parsed.ipv4_mapped
        hit = next((network for network in SHORT_LIST if ipv4 in network), None)
        if hit is not None:
            return AddressVerdict(address, True, f"IPv4-mapped {ipv4} in {hit}", str(hit))
        return _public(address, f"IPv4-mapped {ipv4} is on no entry of the short list")
    return classify_address(address)


def classify_wrappers_by_content(address: str) -> AddressVerdict:
    verdict = classify_address(address)
    if verdict.denied and " embeds public " in verdict.reason:  # the reference's wrapper-range denial
        return _public(address, "a wrapper carrying a public IPv4 is allowed")
    return verdict
