"""Is a destination delivered locally?  Ask the kernel's routing table (rtnetlink ``RTM_GETROUTE``).

A TCP connection from a namespace to an address reaches a listener of that same namespace exactly
when the output route for the address is of type ``RTN_LOCAL`` (``ip route get ADDRESS`` says
``local``): the segment goes out through ``lo`` and is delivered, by address, to a socket bound
there or to a wildcard listener (0.0.0.0 / ::). An address assigned to an interface has such a
route, but so does every address an "AnyIP" route covers (``ip route add local 0.0.0.0/0 dev lo``,
used by transparent proxies and by the lab's catch-all). A bind(2) probe does not see the IPv6
ones: ``inet6_bind`` accepts only addresses assigned to an interface (``ipv6_chk_addr``), while
``inet_bind`` asks the local routing table (``inet_addr_type``) and so agrees with the route for
IPv4. The route lookup is the question a self-connection check has to ask.

The message encoding and decoding (rtnetlink(7), ``struct nlmsghdr``, ``struct rtmsg``,
``RTA_DST``) are pure; :func:`route_type` does the one request on a ``NETLINK_ROUTE`` socket the
caller made in the namespace it asks about.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from ipaddress import IPv4Address, IPv6Address

__all__ = [
    "LOCALLY_DELIVERED",
    "RTN_ANYCAST",
    "RTN_LOCAL",
    "RouteLookupError",
    "decode_route_reply",
    "encode_route_request",
    "is_delivered_locally",
    "route_type",
]

# <linux/rtnetlink.h>, <linux/netlink.h>
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
RTA_DST = 1
RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_ANYCAST = 4
# Route types whose destination is received here: local, and (IPv6) anycast addresses this host
# answers for. Counting anycast as local can only make a self check refuse more.
LOCALLY_DELIVERED = frozenset({RTN_LOCAL, RTN_ANYCAST})

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")  # len, type
_REPLY_BYTES = 65536
_TIMEOUT_SECONDS = 2.0

IPAddress = IPv4Address | IPv6Address


class RouteLookupError(OSError):
    """The kernel's answer could not be read (malformed, for another request, or none in time)."""


def _align4(length: int) -> int:
    return (length + 3) & ~3


def encode_route_request(address: IPAddress, seq: int) -> bytes:
    """An ``RTM_GETROUTE`` request for the output route to ``address`` (as ``ip route get`` sends)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    packed = address.packed
    attribute = _RTATTR.pack(_RTATTR.size + len(packed), RTA_DST) + packed
    attribute += b"\0" * (_align4(len(attribute)) - len(attribute))
    body = _RTMSG.pack(family, len(packed) * 8, 0, 0, 0, 0, 0, 0, 0) + attribute
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body


def decode_route_reply(data: bytes, seq: int) -> int | None:
    """The route type (``RTN_*``) the kernel answered request ``seq`` with, or None if it has no
    route for the destination (``ENETUNREACH`` / ``EHOSTUNREACH``).

    Raises RouteLookupError for any other error reply and for data that is not the answer to ``seq``.
    """
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, reply_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise RouteLookupError(errno.EPROTO, f"truncated netlink message ({length} bytes at {offset})")
        payload = offset + _NLMSGHDR.size
        if reply_seq == seq:
            if kind == NLMSG_ERROR and length >= _NLMSGHDR.size + 4:
                (code,) = struct.unpack_from("=i", data, payload)
                if -code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                    return None
                raise RouteLookupError(-code, f"RTM_GETROUTE: {os.strerror(-code)}")
            if kind == RTM_NEWROUTE and length >= _NLMSGHDR.size + _RTMSG.size:
                return int(_RTMSG.unpack_from(data, payload)[7])
        offset += _align4(length)
    raise RouteLookupError(errno.EPROTO, f"no answer to route request {seq} in {len(data)} bytes")


def route_type(sock: socket.socket, address: IPAddress, seq: int = 1) -> int | None:
    """Ask the namespace of ``sock`` (AF_NETLINK, NETLINK_ROUTE) for the route type to ``address``.

    None when there is no route. Raises OSError (RouteLookupError included) when it cannot be told.
    """
    sock.settimeout(_TIMEOUT_SECONDS)
    sock.sendto(encode_route_request(address, seq), (0, 0))
    for _ in range(8):  # bounded: skip stray messages (none are expected on a fresh socket)
        data = sock.recv(_REPLY_BYTES)
        try:
            return decode_route_reply(data, seq)
        except RouteLookupError as exc:
            if exc.errno != errno.EPROTO or not data:
                raise
    raise RouteLookupError(errno.EPROTO, "the kernel did not answer the route request")


def local_route_socket() -> socket.socket:
    """A NETLINK_ROUTE socket in the calling process's own network namespace."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)


def is_delivered_locally(sock: socket.socket, address: IPAddress) -> bool:
    """Whether a connection to ``address`` from the namespace of ``sock`` is received there."""
    return route_type(sock, address) in LOCALLY_DELIVERED
