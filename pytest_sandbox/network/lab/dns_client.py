"""A resolver that asks the lab's DNS stub from a lab socket: what a proxy under test gets as its resolver.

Kept apart from the stub (``network/dns_stub.py``, the server) and from the lab's listeners: it is the
client side of the lab's DNS, usable from any event loop. Stdlib only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from pytest_sandbox.network.dns_stub import (
    DnsFormatError,
    DnsResponse,
    QueryType,
    ResponseCode,
    encode_query,
    parse_response,
)

__all__ = ["DNS_TIMEOUT_SECONDS", "MAX_DATAGRAM", "Resolver", "make_resolver"]

# The whole resolution's budget (both questions): glibc's default per-try timeout (resolv.conf(5) "timeout:5")
# and the reference proxy's own bound on a lookup (ProxyConfig.resolve_timeout). The stub answers on loopback
# in microseconds when the harness's process gets the CPU; on a loaded machine its loop thread can wait seconds
# for it, and a lookup given up on while the stub is merely late answers 502 resolution_failed: a refusal the
# reference did not mean, which an SSRF verdict reads as a dial attempt.
DNS_TIMEOUT_SECONDS = 5.0
MAX_DATAGRAM = 65536  # a UDP payload never exceeds 65,507 bytes (RFC 768 length field, IPv4 header)
Resolver = Callable[[str], Coroutine[Any, Any, list[str]]]  # async resolve(name) -> addresses


def make_resolver(socket_factory: Callable[[int, int], socket.socket], server: tuple[str, int], *,
                  timeout: float = DNS_TIMEOUT_SECONDS) -> Resolver:
    """An async ``resolve(name) -> [addresses]`` asking ``server`` from ``socket_factory(AF_INET, SOCK_DGRAM)``.

    Asks A, then AAAA; returns IPv4 answers first. NXDOMAIN, NODATA and names that cannot be
    encoded give ``[]``; the two not answered within ``timeout`` (one budget for the whole lookup)
    raises TimeoutError. An IP literal is returned as is (as getaddrinfo(3) does).
    """
    async def resolve(name: str) -> list[str]:
        with contextlib.suppress(ValueError):
            return [str(ipaddress.ip_address(name))]
        try:
            queries = [encode_query(name, qtype, secrets.randbits(16)) for qtype in (QueryType.A, QueryType.AAAA)]
        except DnsFormatError:
            return []
        sock = await asyncio.to_thread(socket_factory, socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, server)
            return await asyncio.wait_for(_ask_in_turn(loop, sock, queries), timeout)
    return resolve


async def _ask_in_turn(loop: asyncio.AbstractEventLoop, sock: socket.socket, queries: list[bytes]) -> list[str]:
    """Each query in turn, the next once the last is answered: their addresses, or ``[]`` on NXDOMAIN."""
    addresses: list[str] = []
    for query in queries:
        await loop.sock_sendall(sock, query)
        response = await _await_reply(loop, sock, query[:2])
        if response.rcode == ResponseCode.NXDOMAIN:
            return []
        if response.rcode == ResponseCode.NOERROR:
            addresses += response.addresses
    return addresses


async def _await_reply(loop: asyncio.AbstractEventLoop, sock: socket.socket, query_id: bytes
                       ) -> DnsResponse:
    """The first datagram that parses as a response with our id (RFC 5452 §4.3: match the id)."""
    while True:
        data = await loop.sock_recv(sock, MAX_DATAGRAM)
        if data[:2] != query_id:
            continue
        with contextlib.suppress(DnsFormatError):
            return parse_response(data)
