"""rtnetlink route lookups (pytest_sandbox.network.route_lookup): the encoding, and the kernel's answers in a
namespace the test makes (plain, then with AnyIP routes, where bind(2) and the route disagree for IPv6)."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from pytest_sandbox.network.netns import NetnsHolder, host_can_create_netns
from pytest_sandbox.network.route_lookup import (
    RTM_GETROUTE,
    RTM_NEWROUTE,
    RTN_LOCAL,
    RTN_UNICAST,
    RouteLookupError,
    decode_route_reply,
    encode_route_request,
    is_delivered_locally,
    route_type,
)

NETNS_OK, NETNS_REASON = host_can_create_netns()


def _reply(kind: int, seq: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 0, seq, 0) + payload


def _route(route_kind: int, seq: int = 7) -> bytes:
    return _reply(RTM_NEWROUTE, seq, struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, 255, 2, 254, route_kind, 0))


def _error(code: int, seq: int = 7) -> bytes:
    return _reply(2, seq, struct.pack("=i", -code) + b"\0" * 16)


@pytest.mark.parametrize(("address", "family", "size"), [
    (IPv4Address("11.0.0.30"), socket.AF_INET, 36), (IPv6Address("2600:9000::77"), socket.AF_INET6, 48)])
def test_request_is_one_getroute_for_the_destination(address, family, size) -> None:
    data = encode_route_request(address, 7)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", data)
    assert (length, kind, flags, seq) == (size, RTM_GETROUTE, 1, 7) and len(data) == size
    assert data[16] == family and data[17] == address.max_prefixlen
    assert struct.unpack_from("=HH", data, 28) == (4 + len(address.packed), 1)  # RTA_DST
    assert data[32:32 + len(address.packed)] == address.packed


def test_reply_decoding() -> None:
    assert decode_route_reply(_route(RTN_LOCAL), 7) == RTN_LOCAL
    assert decode_route_reply(_route(RTN_UNICAST), 7) == RTN_UNICAST
    assert decode_route_reply(_error(errno.ENETUNREACH), 7) is None  # no route at all
    with pytest.raises(RouteLookupError, match="Operation not permitted"):
        decode_route_reply(_error(errno.EPERM), 7)
    with pytest.raises(RouteLookupError, match="no answer to route request 7"):
        decode_route_reply(_route(RTN_LOCAL, seq=8), 7)  # another request's answer is no answer
    with pytest.raises(RouteLookupError, match="truncated"):
        decode_route_reply(struct.pack("=I", 999) + _route(RTN_LOCAL)[4:], 7)  # longer than sent


@pytest.fixture
def holder() -> Iterator[NetnsHolder]:
    if not NETNS_OK:
        pytest.skip(f"cannot create network namespaces: {NETNS_REASON}")
    with NetnsHolder.start(name="test-routes") as started:
        yield started


def _ask(holder: NetnsHolder, address: str) -> int | None:
    with holder.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as routes:
        return route_type(routes, ip_address(address))


def _binds(holder: NetnsHolder, address: str) -> bool:
    with holder.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def test_kernel_answers_local_for_loopback_and_no_route_elsewhere(holder: NetnsHolder) -> None:
    assert _ask(holder, "127.0.0.1") == RTN_LOCAL and _ask(holder, "127.0.0.9") == RTN_LOCAL
    assert _ask(holder, "::1") == RTN_LOCAL
    assert _ask(holder, "11.0.0.30") is None and _ask(holder, "2600:9000::77") is None  # only lo: no route


def test_anyip_routes_deliver_ipv6_addresses_that_bind_refuses(holder: NetnsHolder) -> None:
    holder.run(["ip", "-6", "route", "add", "local", "::/0", "dev", "lo"], check=True, capture_output=True)
    assert _ask(holder, "2600:9000::77") == RTN_LOCAL
    assert not _binds(holder, "2600:9000::77")  # the reason a bind probe is not enough
    with holder.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as routes:
        assert is_delivered_locally(routes, IPv6Address("2600:9000::77"))
        assert not is_delivered_locally(routes, IPv4Address("11.0.0.30"))  # IPv4 has no AnyIP route here
