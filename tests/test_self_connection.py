"""The self-connection decision (pytest_sandbox.network.proxy.self_connection) and the unwrapping it shares with the
classifier (addresses.embedded_ipv4): pure table tests, no sockets."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from pytest_sandbox.network.addresses import embedded_ipv4
from pytest_sandbox.network.proxy.self_connection import reached_addresses, self_connection

V4 = IPv4Address("11.0.0.20")

EMBEDDINGS = [
    ("11.0.0.20", ()),
    ("2600:9000::10", ()),
    ("::ffff:11.0.0.20", (V4,)),  # IPv4-mapped, RFC 4291 §2.5.5.2
    ("::ffff:b00:14", (V4,)),
    ("0:0:0:0:0:FFFF:0B00:0014", (V4,)),
    ("::11.0.0.20", (V4,)),  # IPv4-compatible, RFC 4291 §2.5.5.1
    ("::ffff:0:b00:14", (V4,)),  # SIIT, RFC 6145
    ("64:ff9b::b00:14", (V4,)),  # NAT64, RFC 6052
    ("2002:b00:14::1", (V4,)),  # 6to4 bits 16-47, RFC 3056
    ("2001:0:b00:14::", (V4, IPv4Address("255.255.255.255"))),  # Teredo server, client = ~0
    ("2001:0:4136:e378:8000:63bf:f4ff:ffeb", (IPv4Address("65.54.227.120"), V4)),  # Teredo client, inverted
    ("::", (IPv4Address("0.0.0.0"),)),
]


@pytest.mark.parametrize(("address", "expected"), EMBEDDINGS, ids=[a for a, _ in EMBEDDINGS])
def test_embedded_ipv4_unwraps_every_form_the_classifier_unwraps(address, expected):
    assert embedded_ipv4(address) == expected


def test_embedded_ipv4_refuses_what_is_not_an_address_literal():
    with pytest.raises(ValueError):
        embedded_ipv4("127.1")


REACHED = [
    ("11.0.0.20", ("11.0.0.20",)),
    ("::ffff:11.0.0.20", ("11.0.0.20",)),  # the same socket address, not a second one
    ("64:ff9b::b00:14", ("64:ff9b::b00:14", "11.0.0.20")),
    # Linux: a connect to INADDR_ANY goes to 127.0.0.1, one to :: goes to ::1 (tcp_v6_connect).
    ("0.0.0.0", ("0.0.0.0", "127.0.0.1")),
    ("::", ("::", "0.0.0.0", "::1", "127.0.0.1")),
    ("::ffff:0.0.0.0", ("0.0.0.0", "127.0.0.1")),
]


@pytest.mark.parametrize(("destination", "expected"), REACHED, ids=[d for d, _ in REACHED])
def test_reached_addresses_are_what_a_connect_can_end_up_at(destination, expected):
    assert reached_addresses(destination) == tuple(ip_address(a) for a in expected)


LAB_LOCAL = {ip_address(a) for a in ("127.0.0.1", "127.0.0.2", "11.0.0.10", "11.0.0.20", "2600:9000::10", "::1",
                                     "0.0.0.0", "::")}


def local(address: IPv4Address | IPv6Address) -> bool:
    return address in LAB_LOCAL


SPECIFIC = [("11.0.0.20", 8080)]
WILDCARD_V4 = [("0.0.0.0", 8080)]
WILDCARD_V6 = [("::", 8080)]

# (destination, port, listening, expected: None = not this proxy, else a phrase of the reason)
DECISIONS = [
    ("11.0.0.20", 8080, SPECIFIC, "is this proxy's listening address 11.0.0.20:8080"),
    ("::ffff:11.0.0.20", 8080, SPECIFIC, "(it reaches 11.0.0.20)"),
    ("::ffff:b00:14", 8080, SPECIFIC, "(it reaches 11.0.0.20)"),
    ("0:0:0:0:0:ffff:b00:14", 8080, SPECIFIC, "(it reaches 11.0.0.20)"),
    ("::11.0.0.20", 8080, SPECIFIC, "(it reaches 11.0.0.20)"),
    ("::ffff:0:b00:14", 8080, SPECIFIC, "(it reaches 11.0.0.20)"),
    ("64:ff9b::b00:14", 8080, SPECIFIC, "(it reaches 11.0.0.20)"),
    ("2002:b00:14::1", 8080, SPECIFIC, "(it reaches 11.0.0.20)"),
    ("2001:0:b00:14::", 8080, SPECIFIC, "(it reaches 11.0.0.20)"),
    ("2001:0:4136:e378:8000:63bf:f4ff:ffeb", 8080, SPECIFIC, "(it reaches 11.0.0.20)"),
    ("11.0.0.20", 8081, SPECIFIC, None),  # another port of the same address is another service
    ("11.0.0.21", 8080, SPECIFIC, None),
    ("11.0.0.10", 8080, SPECIFIC, None),  # local, but a specific listener only gets its own address
    ("11.0.0.20", 8080, [("::ffff:11.0.0.20", 8080)], "listening address 11.0.0.20:8080"),  # mapped bind
    ("0.0.0.0", 8080, [("127.0.0.1", 8080)], "(it reaches 127.0.0.1)"),
    ("::", 8080, [("::1", 8080)], "(it reaches ::1)"),
    # A wildcard listener is every local address of its namespace, asked at check time.
    ("11.0.0.10", 8080, WILDCARD_V4, "11.0.0.10 is an address of its network namespace"),
    ("127.0.0.2", 8080, WILDCARD_V4, "listens on 0.0.0.0:8080, every local address"),
    ("::ffff:11.0.0.10", 8080, WILDCARD_V4, "(it reaches 11.0.0.10)"),
    ("11.0.0.99", 8080, WILDCARD_V4, None),  # not local: another host
    ("2600:9000::10", 8080, WILDCARD_V4, None),  # an AF_INET socket never receives IPv6
    ("2600:9000::10", 8080, WILDCARD_V6, "listens on [::]:8080"),
    ("11.0.0.10", 8080, WILDCARD_V6, "listens on [::]:8080"),  # dual-stack unless IPV6_V6ONLY
    ("11.0.0.10", 80, WILDCARD_V4, None),
]


@pytest.mark.parametrize(("destination", "port", "listening", "expected"), DECISIONS,
                         ids=[f"{d}-{p}-{listening[0][0]}" for d, p, listening, _ in DECISIONS])
def test_self_connection_decision(destination, port, listening, expected):
    reason = self_connection(destination, port, listening, local)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason, reason


def test_locality_is_asked_only_for_a_wildcard_listener_on_the_port():
    asked: list[IPv4Address | IPv6Address] = []

    def recording(address: IPv4Address | IPv6Address) -> bool:
        asked.append(address)
        return False

    self_connection("11.0.0.10", 8080, [("11.0.0.20", 8080), ("0.0.0.0", 9090)], recording)
    assert asked == []
    self_connection("::ffff:11.0.0.10", 9090, [("0.0.0.0", 9090)], recording)
    assert asked == [IPv4Address("11.0.0.10")]
