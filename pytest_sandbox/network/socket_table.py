"""A network namespace's TCP sockets as the kernel lists them: evidence no proxy under test can shape.

``/proc/PID/net/tcp`` and ``tcp6`` list every TCP socket of the network namespace PID lives in
(listening, connected and TIME-WAIT), so the harness can read the lab's table from the lab holder's
PID without entering the namespace. A connection the proxy makes to its own listening socket shows
there twice (the dialling end and the accepted end), and after it closes one end stays in TIME-WAIT
for 60 s (``TCP_TIMEWAIT_LEN``), so a loop is still visible after the proxy has answered.

Reading the table walks the kernel's whole established hash (every namespace's buckets) and formats
every row of the namespace, thousands of TIME-WAIT rows after a conformance run: milliseconds. The
namespace's ``Tcp: ActiveOpens`` counter (``/proc/PID/net/snmp``, RFC 1213 ``tcpActiveOpens``,
incremented by ``tcp_connect``) costs microseconds and tells whether anyone in the namespace opened
a connection at all, so the table need only be read when it moved.

Parsing is pure (:func:`parse_tcp_table`), table-tested against lines in the kernel's format
(``tcp4_seq_show``/``tcp6_seq_show``: addresses are the in-memory ``__be32`` words printed with
``%08X``, i.e. in host byte order; ports are printed after ``ntohs``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Literal

__all__ = [
    "TCP_LISTEN",
    "TcpSocket",
    "parse_tcp_counters",
    "parse_tcp_table",
    "peers_of",
    "read_active_opens",
    "read_tcp_table",
]

# include/net/tcp_states.h
TCP_LISTEN = 0x0A

Endpoint = tuple[str, int]
ByteOrder = Literal["little", "big"]


@dataclass(frozen=True)
class TcpSocket:
    """One row: local and remote (address, port), IPv4-mapped addresses shown as IPv4, and the state."""

    local: Endpoint
    remote: Endpoint
    state: int


def _address(text: str, byteorder: ByteOrder) -> str:
    words = [int(text[i:i + 8], 16).to_bytes(4, byteorder) for i in range(0, len(text), 8)]
    raw = b"".join(words)
    if len(raw) == 4:
        return str(IPv4Address(raw))
    address = IPv6Address(raw)
    # An AF_INET6 socket talking IPv4 lists ::ffff:a.b.c.d; it is the IPv4 endpoint (RFC 4291 §2.5.5.2).
    return str(address.ipv4_mapped or address)


def _endpoint(text: str, byteorder: ByteOrder) -> Endpoint:
    address, _, port = text.partition(":")
    return _address(address, byteorder), int(port, 16)


def parse_tcp_table(text: str, *, byteorder: ByteOrder = sys.byteorder,
                    port: int | None = None) -> tuple[TcpSocket, ...]:
    """The rows of one ``/proc/net/tcp`` or ``tcp6`` text; with ``port``, only rows with that port on
    either side (a cheap text filter first: the lab's table holds thousands of TIME-WAIT rows)."""
    needle = None if port is None else f":{port:04X} "
    rows: list[TcpSocket] = []
    for line in text.splitlines()[1:]:
        if needle is not None and needle not in line:
            continue
        fields = line.split()
        if len(fields) < 4:
            continue
        local, remote = _endpoint(fields[1], byteorder), _endpoint(fields[2], byteorder)
        if port is not None and port not in (local[1], remote[1]):
            continue
        rows.append(TcpSocket(local, remote, int(fields[3], 16)))
    return tuple(rows)


def read_tcp_table(pid: int, *, port: int | None = None) -> tuple[TcpSocket, ...]:
    """Every TCP socket (IPv4 and IPv6) of the network namespace process ``pid`` is in."""
    rows: list[TcpSocket] = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}", encoding="ascii") as table:
                text = table.read()
        except FileNotFoundError:
            if name == "tcp6":  # a kernel without IPv6 has no tcp6 table
                continue
            raise
        rows += parse_tcp_table(text, port=port)
    return tuple(rows)


def peers_of(rows: Iterable[TcpSocket], endpoint: Endpoint) -> frozenset[Endpoint]:
    """The far end of every non-listening socket with ``endpoint`` on one side.

    A connection inside one namespace appears as two rows (the connecting end and the accepted end)
    and both name the same peer; the listening socket itself is left out.
    """
    peers: set[Endpoint] = set()
    for row in rows:
        if row.state == TCP_LISTEN:
            continue
        if row.local == endpoint:
            peers.add(row.remote)
        elif row.remote == endpoint:
            peers.add(row.local)
    return frozenset(peers)


def parse_tcp_counters(text: str) -> dict[str, int]:
    """The ``Tcp:`` counters of one ``/proc/net/snmp`` text (a header line, then a value line)."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
    if len(rows) != 2 or len(rows[0]) != len(rows[1]):
        raise ValueError("no Tcp: header and value lines in the snmp text")
    return {name: int(value) for name, value in zip(rows[0], rows[1], strict=True)}


def read_active_opens(pid: int) -> int:
    """``ActiveOpens`` (connections this namespace initiated) of the namespace process ``pid`` is in."""
    with open(f"/proc/{pid}/net/snmp", encoding="ascii") as snmp:
        return parse_tcp_counters(snmp.read())["ActiveOpens"]
