"""Would dialling this address and port reach the proxy itself?  Pure: the caller says what is local.

A proxy that dials its own listening socket loops: the request comes back in as a new client, from
the proxy's own address (network.md section 1.3, "the proxy's own listen address and port"; smokescreen
checks it first).  Comparing the destination's text with the listening address misses every other
spelling of the same socket address, so the check here works on what a ``connect(2)`` would reach:

* **Unwrapped destinations.**  ``::ffff:11.0.0.20`` (any spelling: dotted tail, hex words, leading
  zeros) *is* 11.0.0.20 on a dual-stack socket (RFC 4291 section 2.5.5.2), and the other IPv6 forms
  that carry an IPv4 address (IPv4-compatible, SIIT, NAT64, 6to4, Teredo) are unwrapped with the
  table :func:`pytest_sandbox.network.addresses.embedded_ipv4` shares with the classifier: if any embedded
  IPv4 is the listening address, the destination is this proxy.
* **The unspecified address.**  Linux sends a connect to 0.0.0.0 to 127.0.0.1 and one to ``::`` to
  ``::1`` (``__ip_route_output_key`` and ``tcp_v6_connect``: "connect() to INADDR_ANY means
  loopback"), so those loopback addresses are reached too.
* **Wildcard listeners.**  A listener on 0.0.0.0 accepts a connection to *every* local IPv4
  address of its namespace (a listener on ``::`` every local address, IPv4 too unless
  IPV6_V6ONLY), including addresses added after it started.  So the question is asked of the
  namespace at check time: ``is_local(address)``, never from a snapshot. The proxy answers it from
  its dialling namespace: a bind(2) probe, then the routing table (``RTM_GETROUTE``: is the route
  ``local``?), because AnyIP routes (``local ::/0 dev lo``) deliver addresses no interface has
  and an IPv6 bind does not see them (:mod:`pytest_sandbox.network.route_lookup`). Where such routes make
  every address local, every address on the proxy's own port is refused: more than loops in a lab
  whose catch-all diverts unowned addresses, never less.

Only the port the proxy listens on matters: another port of a local address is another service,
which the classifier (loopback, private...) judges on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv6Address, ip_address

from pytest_sandbox.network.addresses import embedded_ipv4

__all__ = ["reached_addresses", "self_connection"]

IPAddress = IPv4Address | IPv6Address
IsLocal = Callable[[IPAddress], bool]

_LOOPBACK: dict[int, IPAddress] = {4: IPv4Address("127.0.0.1"), 6: IPv6Address("::1")}


def _parse(address: str | IPAddress) -> IPAddress:
    if isinstance(address, IPv4Address | IPv6Address):
        parsed: IPAddress = address
    else:
        parsed = ip_address(address)
    if isinstance(parsed, IPv6Address) and parsed.scope_id is not None:
        parsed = IPv6Address(int(parsed))
    return parsed


def _unmapped(address: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` is the IPv4 address itself (RFC 4291 section 2.5.5.2); others unchanged."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def reached_addresses(destination: str | IPAddress) -> tuple[IPAddress, ...]:
    """Every address a ``connect(2)`` to ``destination`` can end up at, the destination first.

    An IPv4-mapped address is replaced by its IPv4 address (the same socket address); every other
    embedded IPv4 is added; an unspecified address adds the loopback address Linux substitutes.
    """
    address = _unmapped(_parse(destination))
    reached: list[IPAddress] = [address, *embedded_ipv4(address)]
    for candidate in list(reached):
        if candidate.is_unspecified:
            reached.append(_LOOPBACK[candidate.version])
    return tuple(dict.fromkeys(reached))


def _endpoint(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _wildcard_covers(listener: IPAddress, candidate: IPAddress) -> bool:
    # An AF_INET socket on 0.0.0.0 never receives IPv6; "::" may receive both (IPV6_V6ONLY is off by
    # default, net.ipv6.bindv6only=0), so it is taken to cover both.
    return listener.version == 6 or candidate.version == 4


def self_connection(destination: str | IPAddress, port: int, listening: Iterable[tuple[str, int]],
                    is_local: IsLocal) -> str | None:
    """Why dialling ``destination`` port ``port`` would reach one of the ``listening`` sockets, or None.

    ``listening`` holds the (address, port) pairs the proxy is bound to (a wildcard address means
    every local address); ``is_local`` says whether an address belongs to the namespace the proxy
    dials from, and is asked only for wildcard listeners on ``port``.
    """
    shown = str(_parse(destination))
    reached = reached_addresses(destination)
    for listen_text, listen_port in listening:
        if listen_port != port:
            continue
        bound = _unmapped(_parse(listen_text))
        for candidate in reached:
            via = "" if str(candidate) == shown else f" (it reaches {candidate})"
            if bound.is_unspecified:
                if _wildcard_covers(bound, candidate) and is_local(candidate):
                    return (f"{_endpoint(_parse(destination), port)} is this proxy{via}: {candidate} is an "
                            f"address of its network namespace and the proxy listens on "
                            f"{_endpoint(bound, port)}, every local address")
            elif candidate == bound:
                return f"{_endpoint(_parse(destination), port)} is this proxy's listening address " \
                       f"{_endpoint(bound, port)}{via}"
    return None
