"""The network lab: a private namespace with a catch-all canary, lab-only public origins and a DNS stub.

Network probes must never send a packet off the host (network.md §7). A :class:`NetworkLab` owns one
:class:`~pytest_sandbox.network.netns.NetnsHolder` whose namespace has nothing but ``lo``, and puts there:

* a **catch-all canary**: every address is local to the lab, and every TCP connection that no lab
  socket owns (no listener bound to its exact address and port) is diverted to one transparent
  listener per family (see :func:`~pytest_sandbox.network.netns.catch_all_ruleset`). It records each such
  connection as a :class:`~pytest_sandbox.network.lab.attribution.CatchAllHit` (when, the original destination, the
  first 4 KiB) and answers a minimal ``HTTP 200`` naming that destination. So a proxy that dials
  169.254.169.254:80, 10.0.0.1:8443, [fe80::1%lo]:80 or 127.255.255.255:80 is seen, whatever the
  port, however late. A denial only counts if the catch-all saw nothing it can be blamed for.
* **lab-only public origins**: addresses outside every special-use range (:data:`LAB_PUBLIC_ORIGINS`)
  serving HTTP/1.1 with keep-alive. They keep **every byte** each connection delivers
  (:meth:`NetworkLab.origin_streams`, up to 1 MiB per connection, truncation recorded), frame
  requests from those bytes for :meth:`NetworkLab.origin_requests`, never refuse what they cannot
  frame (their parser is not the one under test), and mark every response with
  ``X-Lab-Mark: <NetworkLab.origin_mark>``, a per-lab random token, so a judge can tell an answer
  the origin wrote from one the proxy wrote (see :mod:`pytest_sandbox.http.upstream`). They exist only
  on the lab's ``lo``; on the host they are ordinary Internet addresses that nothing here ever
  dials. They are the positive controls: an allowed request must reach them.
* a **DNS stub** on 127.0.0.53:53 (see :mod:`pytest_sandbox.network.dns_stub`) for names, mixed answers and
  rebinding.

The harness's own connections (:meth:`NetworkLab.connect`, e.g. to the proxy under test) carry a
mark the catch-all lets through, so they reach a real listener or are refused; a proxy's dials
(:meth:`NetworkLab.socket`, or any process in the lab) carry none. The lab also keeps the ledger the
verdicts use: attempt windows (:meth:`NetworkLab.register_attempts`) and which hits a verdict has
accounted for (:meth:`NetworkLab.account`); the session-end audit reports every other hit.

All listeners share one asyncio event loop in a background thread of the pytest process
(``loop.py``); their sockets come from the holder by fd passing. The connections they accept are in
``connections.py`` (catch-all) and ``origin.py`` (public origins); the stub's client is
``dns_client.py``. This module is the facade that owns them. Every query method first *settles* the lab: on the loop
thread it accepts every connection already in a kernel accept queue and reads every byte already
delivered, so a count never misses a connection that completed before the query. (On loopback the
TCP handshake completes inside the client's connect(2), so "connected" implies "queued here".)
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from pytest_sandbox.http.upstream import ReceivedStream, UpstreamLedger, new_mark
from pytest_sandbox.network.dns_stub import DnsStubProtocol, DnsZone
from pytest_sandbox.network.lab.attribution import AttemptWindow, CatchAllHit
from pytest_sandbox.network.lab.connections import (
    ListenerKey,
    _CatchAllConnection,
    _Connection,
    _HitRecord,
    _Listener,
    _original_destination,
)
from pytest_sandbox.network.lab.dns_client import DNS_TIMEOUT_SECONDS, Resolver, make_resolver
from pytest_sandbox.network.lab.loop import LOOP_CALL_TIMEOUT_SECONDS, LoopThread
from pytest_sandbox.network.lab.origin import OriginRequest, _OriginConnection
from pytest_sandbox.network.netns import HARNESS_MARK, SOCKET_BATCH, NetnsHolder, NetnsId, ensure_lab_socket

__all__ = [
    "CATCH_ALL_LISTEN",
    "LAB_DNS_ADDRESS",
    "LAB_DNS_PORT",
    "LAB_PUBLIC_ORIGINS",
    "HitSnapshot",
    "NetworkLab",
    "OriginRequest",
]

# Lab-only "public" origins. 11.0.0.0/8 and 2600:9000::/28 are ordinary global unicast space, outside
# every special-use range, so an SSRF-safe proxy must allow them. They are bound only on the lab's
# lo; nothing in this package ever dials them from the host namespace.
LAB_PUBLIC_ORIGINS: tuple[str, ...] = ("11.0.0.10", "11.0.0.11", "2600:9000::10")
DEFAULT_PORTS: tuple[int, ...] = (80, 443)

# Where the catch-all's transparent listeners sit (nft tproxy "to" addresses); ports are the kernel's.
CATCH_ALL_LISTEN: dict[socket.AddressFamily, str] = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}

# 127.0.0.53 is inside 127.0.0.0/8, which lo answers for in full, so it needs no address of its own.
LAB_DNS_ADDRESS = "127.0.0.53"
LAB_DNS_PORT = 53

LISTEN_BACKLOG = 128
DEFAULT_IDLE_TIMEOUT_SECONDS = 5.0

Socket = socket.socket  # NetworkLab.socket() shadows the module name inside the class body
T = TypeVar("T")


def _canonical(addr: str) -> str:
    return str(ipaddress.ip_address(addr))


def _family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET if ipaddress.ip_address(addr).version == 4 else socket.AF_INET6


def _refuse_unusable_listen_address(addr: str, role: str) -> str:
    """Return the canonical form of ``addr``, or raise ValueError if it cannot be that ``role``.

    A canary is an address the catch-all must be able to observe: TCP must be able to reach it. A
    public origin is also bound by a listener, so it must not need a scope id either.
    """
    try:
        address = ipaddress.ip_address(addr)
    except ValueError as exc:
        raise ValueError(f"{role} {addr!r} is not an IP address") from exc
    if address.is_unspecified:
        raise ValueError(
            f"{role} {address} is the wildcard address: Linux delivers a connect to 0.0.0.0/:: to "
            "127.0.0.1/::1 (ip_route_output_key_hash_rcu, tcp_v6_connect), so observe that case as a "
            "127.0.0.1 or ::1 canary"
        )
    if address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(
            f"{role} {address} is multicast/broadcast: TCP cannot connect there (tcp_v4_connect and "
            "tcp_v6_connect refuse before sending), so a canary would prove nothing"
        )
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        raise ValueError(
            f"{role} {address} is IPv4-mapped: connecting to it reaches the IPv4 address "
            f"{address.ipv4_mapped}; use that as the canary"
        )
    if role != "canary" and isinstance(address, ipaddress.IPv6Address) and address.is_link_local:
        raise ValueError(f"{role} {address} is IPv6 link-local: it needs a scope id; pick another")
    return str(address)


class HitSnapshot(dict[tuple[str, int], int]):
    """Catch-all hits per (address, port) at one moment, and how far the hit log reached then.

    ``through`` is the number of hits recorded when it was taken: the hits between two snapshots
    are exactly the indices ``before.through`` to ``after.through - 1``.
    """

    def __init__(self, counts: Mapping[tuple[str, int], int], through: int, lab: NetworkLab | None) -> None:
        super().__init__(counts)
        self.through = through
        self.lab = lab


# --------------------------------------------------------------------------------------------------
# The lab
# --------------------------------------------------------------------------------------------------


class NetworkLab:
    """A catch-all canary, lab-only public origins and a DNS stub inside one private network namespace.

    Use :meth:`start`. Two labs (e.g. two xdist workers) share nothing: each has its own namespace,
    helper, loop thread, zone and hit log, so the same destination can be observed in both.
    ``canaries`` names the destinations a caller means to observe (checked to be observable at all);
    the catch-all observes every other address too.
    """

    def __init__(self, *, holder: NetnsHolder, canaries: tuple[str, ...], public_origins: tuple[str, ...],
                 ports: tuple[int, ...], origin_ports: tuple[int, ...], idle_timeout: float) -> None:
        self.holder = holder
        self.canaries = canaries
        self.public_origins = public_origins
        self.ports = ports
        self.origin_ports = origin_ports
        self.idle_timeout = idle_timeout
        self.zone = DnsZone()
        self._listeners: dict[ListenerKey, _Listener] = {}
        self._connections: set[_Connection] = set()
        self._origin_requests: list[OriginRequest] = []
        self._origin_streams: list[_OriginConnection] = []
        # The token in X-Lab-Mark on every origin response; a proxy cannot know it in advance.
        self.origin_mark = new_mark()
        self._hits: list[_HitRecord] = []
        self._accounted: dict[int, str] = {}  # hit index -> the verdict that accounted for it
        self._windows: list[AttemptWindow] = []
        # Which upstream bytes (origins here, and the inference backends of this lab) a verdict
        # judged, and the upstream attempts sent: read and written by the main thread only.
        self.upstream_ledger = UpstreamLedger()
        self._dns_transport: asyncio.BaseTransport | None = None
        self._loop_thread = LoopThread(f"{holder.name}-loop")
        self._closed = False

    @classmethod
    def start(
        cls,
        canaries: Iterable[str] = (),
        *,
        ports: Iterable[int] = DEFAULT_PORTS,
        public_origins: Iterable[str] = LAB_PUBLIC_ORIGINS,
        origin_ports: Iterable[int] | None = None,
        names: Mapping[str, Iterable[str]] | None = None,
        name: str = "lab",
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
    ) -> NetworkLab:
        """Create the namespace, install the catch-all, add the origins to lo, start listeners and the stub.

        ``origin_ports`` defaults to ``ports``. ``names`` seeds the DNS zone. Raises ValueError for a
        canary TCP cannot reach or an unusable origin, HostUnsupportedError when the host cannot
        create the namespace or lacks nft.
        """
        canary_list = tuple(dict.fromkeys(_refuse_unusable_listen_address(a, "canary") for a in canaries))
        origin_list = tuple(dict.fromkeys(
            _refuse_unusable_listen_address(a, "public origin") for a in public_origins))
        overlap = set(canary_list) & set(origin_list)
        if overlap:
            raise ValueError(f"addresses {sorted(overlap)} are both canaries and public origins")
        port_list = tuple(dict.fromkeys(_checked_port(p) for p in ports))
        origin_port_list = port_list if origin_ports is None else tuple(
            dict.fromkeys(_checked_port(p) for p in origin_ports))

        holder = NetnsHolder.start(name=name)
        lab = cls(holder=holder, canaries=canary_list, public_origins=origin_list, ports=port_list,
                  origin_ports=origin_port_list, idle_timeout=idle_timeout)
        try:
            lab._start(names)
        except BaseException:
            lab.close()
            raise
        return lab

    def _start(self, names: Mapping[str, Iterable[str]] | None) -> None:
        if names:
            self.zone.set_names(names)
        self._loop_thread.start()
        ports: dict[socket.AddressFamily, int] = {}
        for family, address in CATCH_ALL_LISTEN.items():
            # Transparent (IP_TRANSPARENT): TPROXY only hands connections to such a socket, and the
            # sockets it accepts carry the original destination as their own address.
            sock = self.holder.socket(family, socket.SOCK_STREAM, transparent=True)
            try:
                ensure_lab_socket(sock, self.netns_id)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address, 0))
                sock.listen(LISTEN_BACKLOG)
            except BaseException:
                sock.close()
                raise
            ports[family] = int(sock.getsockname()[1])
            self._add_listener(_Listener(key=(address, ports[family]), role="catch-all", sock=sock))
        self.holder.install_catch_all(ports[socket.AF_INET], ports[socket.AF_INET6], HARNESS_MARK)
        self.holder.add_addresses(list(self.public_origins))
        for address in self.public_origins:
            for port in self.origin_ports:
                self._add_listener(_Listener(key=(address, port), role="origin", sock=self.listen(address, port)))
        dns_socket = self.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dns_socket.bind((LAB_DNS_ADDRESS, LAB_DNS_PORT))
        dns_socket.setblocking(False)
        endpoint = asyncio.run_coroutine_threadsafe(
            self.loop.create_datagram_endpoint(lambda: DnsStubProtocol(self.zone), sock=dns_socket),
            self.loop,
        )
        self._dns_transport, _protocol = endpoint.result(timeout=LOOP_CALL_TIMEOUT_SECONDS)

    def _add_listener(self, listener: _Listener) -> None:
        listener.sock.setblocking(False)
        self._listeners[listener.key] = listener
        self._call(self._watcher_for(listener))

    def _watcher_for(self, listener: _Listener) -> Callable[[], None]:
        def watch() -> None:
            self.loop.add_reader(listener.sock.fileno(), self._accept_all, listener)
        return watch

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the loop thread, close every socket and kill the helper by PID. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._loop_thread.stop(self._shutdown_in_loop):
                for listener in self._listeners.values():
                    listener.sock.close()
        finally:
            self.holder.close()

    def _shutdown_in_loop(self) -> None:
        for connection in list(self._connections):
            connection.close()
        for listener in self._listeners.values():
            self.loop.remove_reader(listener.sock.fileno())
            listener.sock.close()
        if self._dns_transport is not None:
            self._dns_transport.close()

    def __enter__(self) -> NetworkLab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<NetworkLab {self.holder.name!r} canaries={len(self.canaries)} hits={len(self._hits)} "
                f"origins={len(self.public_origins)} closed={self._closed}>")

    # -- identity and sockets --------------------------------------------------------------------

    @property
    def netns_path(self) -> str:
        return self.holder.netns_path

    @property
    def netns_id(self) -> NetnsId:
        return self.holder.netns_id

    @property
    def dns_server(self) -> tuple[str, int]:
        return (LAB_DNS_ADDRESS, LAB_DNS_PORT)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
               proto: int = 0) -> socket.socket:
        """A new socket inside this lab (guarded: refuses anything that is not in this lab)."""
        sock = self.holder.socket(family, type, proto)
        try:
            ensure_lab_socket(sock, self.netns_id)
        except BaseException:
            sock.close()
            raise
        return sock

    def route_socket(self) -> Socket:
        """An rtnetlink socket (NETLINK_ROUTE) inside this lab: asks the lab's routing table."""
        return self.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)

    def owned_addresses(self) -> frozenset[str]:
        """The addresses this lab gave itself: with 127.0.0.0/8 and ::1, exactly those a wildcard
        listener in the lab receives connections on (see NetnsHolder.owned_addresses)."""
        return self.holder.owned_addresses()

    def listen(self, addr: str, port: int, *, backlog: int = LISTEN_BACKLOG) -> Socket:
        """A listening TCP socket on ``addr:port`` inside the lab (the address is added to lo)."""
        address = _canonical(addr)
        self.holder.add_address(address)
        sock = self.socket(_family_of(address), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def connect(self, addr: str, port: int, timeout: float = 5.0) -> Socket:
        """The harness's own TCP connection from inside the lab to the listener on ``addr:port``.

        It carries the harness mark, so the catch-all never takes it: it reaches the listener bound
        there or fails (ECONNREFUSED), and it is never a hit. Use :meth:`dial` to connect as a
        proxy would. The socket has ``timeout`` set.
        """
        return self._connect(addr, port, timeout, mark=HARNESS_MARK, scope_id=0)

    def dial(self, addr: str, port: int, timeout: float = 5.0, *, scope_id: int = 0) -> Socket:
        """A TCP connection from inside the lab as a proxy's dial: reaches a listener, else the catch-all.

        ``scope_id`` is the interface index an IPv6 link-local destination needs (1 is the lab's lo).
        """
        return self._connect(addr, port, timeout, mark=None, scope_id=scope_id)

    def _connect(self, addr: str, port: int, timeout: float, *, mark: int | None, scope_id: int) -> Socket:
        address = _canonical(addr)
        family = _family_of(address)
        sock = self.holder.socket(family, socket.SOCK_STREAM, mark=mark, batch=SOCKET_BATCH)
        try:
            ensure_lab_socket(sock, self.netns_id)
            sock.settimeout(timeout)
            sock.connect((address, port) if family == socket.AF_INET else (address, port, 0, scope_id))
        except BaseException:
            sock.close()
            raise
        return sock

    def popen(self, argv: Sequence[str], **kwargs: Any) -> Any:
        """Start a command inside the lab namespace (see NetnsHolder.popen)."""
        return self.holder.popen(argv, **kwargs)

    def run(self, argv: Sequence[str], **kwargs: Any) -> Any:
        """Run a command inside the lab namespace to completion (see NetnsHolder.run)."""
        return self.holder.run(argv, **kwargs)

    # -- evidence ----------------------------------------------------------------------------------

    def hits(self, since: int = 0) -> list[CatchAllHit]:
        """Every catch-all hit from index ``since`` on, oldest first (settled: none missed)."""
        return self._call(lambda: self._settled(lambda: [hit.frozen() for hit in self._hits[since:]]))

    def hit_mark(self) -> int:
        """How many hits the catch-all has recorded so far (settled): a ``since`` for :meth:`hits`."""
        return self._call(lambda: self._settled(lambda: len(self._hits)))

    def canary_hits(self, addr: str, port: int | None = None) -> int:
        """Catch-all hits on destination ``addr`` (on ``port``, or on any port).

        Any address can be asked (the catch-all observes them all); text that is not an IP address
        raises ValueError, so a typo never reads as "zero hits".
        """
        address = _canonical_or_error(addr)
        return self._call(lambda: self._settled(lambda: sum(
            1 for hit in self._hits if hit.address == address and (port is None or hit.port == port))))

    def all_hits(self) -> HitSnapshot:
        """Catch-all hits per (destination address, port) so far, and the log position (``through``).

        Diff two snapshots with :func:`pytest_sandbox.probes.ssrf.new_hits`.
        """
        def snapshot() -> HitSnapshot:
            counts: dict[tuple[str, int], int] = {}
            for hit in self._hits:
                counts[(hit.address, hit.port)] = counts.get((hit.address, hit.port), 0) + 1
            return HitSnapshot(counts, len(self._hits), self)
        return self._call(lambda: self._settled(snapshot))

    # -- the ledger: attempt windows and accounted hits ---------------------------------------------

    def register_attempts(self, windows: Iterable[AttemptWindow]) -> None:
        """Record attempts sent through a proxy in this lab, so that every later hit can be attributed."""
        added = list(windows)
        self._call(lambda: self._windows.extend(added))

    def attempt_windows(self) -> list[AttemptWindow]:
        """Every attempt registered since the last reset, in registration order."""
        return self._call(lambda: list(self._windows))

    def account(self, indices: Iterable[int], by: str) -> None:
        """Record that a verdict (``by``) counted these hits; the first verdict to count one keeps it."""
        chosen = list(indices)

        def mark() -> None:
            for index in chosen:
                if 0 <= index < len(self._hits):
                    self._accounted.setdefault(index, by)
        self._call(mark)

    def accounted_by(self, index: int) -> str | None:
        """The verdict that counted hit ``index``, or None."""
        return self._call(lambda: self._accounted.get(index))

    def unaccounted_hits(self) -> list[CatchAllHit]:
        """Settled hits no verdict has counted: what the session-end audit reports."""
        return self._call(lambda: self._settled(lambda: [
            hit.frozen() for hit in self._hits if hit.index not in self._accounted]))

    def origin_connections(self, addr: str, port: int | None = None) -> int:
        """Connections accepted by public origin ``addr`` (on ``port``, or on all its ports)."""
        keys = self._keys_for(addr, port, role="origin")
        return self._call(lambda: self._settled(lambda: sum(self._listeners[k].accepted for k in keys)))

    def received(self, addr: str, port: int | None = None) -> list[bytes]:
        """Bytes received per connection on destination ``addr``, oldest connection first.

        A public origin's connections are recorded in full up to 1 MiB (:meth:`origin_streams` also
        says how many bytes arrived in all); any other destination is a catch-all hit (first 4 KiB).
        """
        address = _canonical_or_error(addr)
        keys = [key for key, listener in self._listeners.items()
                if listener.role == "origin" and key[0] == address and (port is None or key[1] == port)]
        return self._call(lambda: self._settled(lambda: [
            *(bytes(record) for key in keys for record in self._listeners[key].records),
            *(bytes(hit.received) for hit in self._hits
              if hit.address == address and (port is None or hit.port == port))]))

    def origin_requests(self, addr: str | None = None, port: int | None = None) -> list[OriginRequest]:
        """Complete requests the public origins framed (h11) and answered, in arrival order.

        A parsed view of :meth:`origin_streams`: bytes h11 could not frame are absent here but
        present there.
        """
        keys = set(self._keys_for(addr, port, role="origin")) if addr is not None else None
        return self._call(lambda: self._settled(lambda: [
            request for request in self._origin_requests
            if (keys is None or (request.origin, request.port) in keys)
            and (port is None or request.port == port)]))

    def origin_streams(self, addr: str | None = None, port: int | None = None) -> list[ReceivedStream]:
        """Every byte each public-origin connection received (up to 1 MiB each), oldest first.

        The evidence the smuggling judge reads: what reached the origin, whether or not the
        origin's own parser could frame it.
        """
        keys = set(self._keys_for(addr, port, role="origin")) if addr is not None else None
        return self._call(lambda: self._settled(lambda: [
            connection.stream() for connection in self._origin_streams
            if (keys is None or connection.listener.key in keys)
            and (port is None or connection.listener.key[1] == port)]))

    def reset_hits(self) -> None:
        """Forget all evidence: hits, attempt windows, accounting, received bytes, origin requests and
        the DNS query log."""
        def reset() -> None:
            for listener in self._listeners.values():
                listener.accepted = 0
                listener.records.clear()
            self._origin_requests.clear()
            self._origin_streams.clear()
            self._hits.clear()
            self._accounted.clear()
            self._windows.clear()
        self._call(lambda: self._settled(reset))
        self.upstream_ledger.clear()
        self.zone.clear_queries()

    def _keys_for(self, addr: str, port: int | None, role: str | None) -> list[ListenerKey]:
        address = _canonical(addr)
        keys = [key for key, listener in self._listeners.items()
                if key[0] == address and (role is None or listener.role == role)
                and (port is None or key[1] == port)]
        if not keys:
            what = role or "listener"
            known = self.public_origins
            raise ValueError(f"{address}{'' if port is None else f' port {port}'} is not a {what} "
                             f"of this lab (known: {', '.join(known)})")
        return keys

    # -- DNS ---------------------------------------------------------------------------------------

    def set_zone(self, names: Mapping[str, Iterable[str]]) -> None:
        """Replace every name the stub knows."""
        self.zone.set_names(names)

    def add_name(self, name: str, addresses: Iterable[str]) -> None:
        """Make ``name`` resolve to ``addresses`` (several addresses give several answers)."""
        self.zone.add_name(name, addresses)

    def add_rebinding_name(self, name: str, first: Sequence[str] | str,
                           then: Sequence[str] | str = "127.0.0.1") -> None:
        """Make ``name`` answer ``first`` and ``then`` alternately, per query type, with TTL 0."""
        def as_set(value: Sequence[str] | str) -> Sequence[str]:
            return (value,) if isinstance(value, str) else value

        self.zone.add_rebinding_name(name, [as_set(first), as_set(then)])

    def dns_queries(self) -> list[tuple[str, int]]:
        """Every (name, qtype) the stub answered since the last reset, oldest first."""
        return self.zone.queries()

    def resolver(self, *, timeout: float = DNS_TIMEOUT_SECONDS) -> Resolver:
        """An async ``resolve(name) -> [addresses]`` that asks this lab's stub from a lab socket.

        See :func:`~pytest_sandbox.network.lab.dns_client.make_resolver`. Usable from any event loop.
        """
        return make_resolver(self.socket, self.dns_server, timeout=timeout)

    def lookup(self, name: str) -> list[str]:
        """Synchronous :meth:`resolver` for tests (do not call from a running event loop)."""
        return asyncio.run(self.resolver()(name))

    # -- loop-thread plumbing ------------------------------------------------------------------------

    def _call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the loop thread and return its result."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        return self._loop_thread.call(function)

    # -- what the connections report to (connections.LabLoop, origin.OriginLab; loop thread only) --

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The lab's event loop (it runs in the lab's own thread; every lab socket is served there)."""
        return self._loop_thread.loop

    def forget(self, connection: _Connection) -> None:
        self._connections.discard(connection)

    def record_request(self, request: OriginRequest) -> None:
        self._origin_requests.append(request)

    def add_stream(self, connection: _OriginConnection) -> None:
        self._origin_streams.append(connection)

    def _settled(self, snapshot: Callable[[], T]) -> T:
        for listener in self._listeners.values():
            self._accept_all(listener)
        for connection in list(self._connections):
            connection.on_readable()
        return snapshot()

    def _accept_all(self, listener: _Listener) -> None:
        while True:
            try:
                sock, _peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # accept(2): a connection reset while queued may surface as ECONNABORTED; the kernel
                # already dropped it, so it is not counted, and the next one may still be queued.
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                return
            listener.accepted += 1
            connection: _Connection
            if listener.role == "catch-all":
                address, port = _original_destination(sock)
                hit = _HitRecord(len(self._hits), time.monotonic(), address, port, bytearray())
                self._hits.append(hit)
                connection = _CatchAllConnection(self, listener, sock, listener.accepted, hit)
            else:
                connection = _OriginConnection(self, listener, sock, listener.accepted)
            self._connections.add(connection)
            connection.on_readable()


def _canonical_or_error(addr: str) -> str:
    try:
        return _canonical(addr)
    except ValueError as exc:
        raise ValueError(f"{addr!r} is not an IP address: ask for hits on a destination address") from exc


def _checked_port(port: int) -> int:
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port {port!r} is not in 1..65535")
    return port
