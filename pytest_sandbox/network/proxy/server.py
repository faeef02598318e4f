"""The reference egress proxy: CONNECT and absolute-form HTTP/1.1, SSRF-safe, every request judged.

The rule (network.md §3): canonicalise the authority (anything odd is 400) -> check the host and
port policy -> resolve **once** with the injected resolver (IP literals are not resolved) ->
classify **every** answer -> deny if any answer is special -> dial **exactly** a checked address
with a socket from the injected factory (no hostname ever reaches a function that could resolve it
again) -> repeat for every request on a keep-alive connection and every new upstream connection.
The decision itself is pure (:mod:`pytest_sandbox.network.proxy.decision`); this module is the I/O
around it: reading, resolving when asked, dialling, forwarding, answering and recording.

Requests are framed strictly (:mod:`pytest_sandbox.http.framing`); a framing violation is answered and
the connection closed without parsing another byte (network.md §5). Every request and CONNECT gets
one :class:`Decision` with a reason code.

Two switches weaken the proxy on purpose, so a conformance suite can prove it detects the holes
they open: ``strict_framing=False`` (h11 0.16 framing only) and ``judge_every_request=False``
(only the first request of a connection is judged; later ones ride its upstream connection, as
OpenShell's absolute-form path did at PR #819).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import itertools
import json
import os
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from pytest_sandbox.http.fields import end_to_end
from pytest_sandbox.http.framing import FramingViolation
from pytest_sandbox.http.streams import (
    Request,
    RequestReader,
    Reserve,
    Response,
    write_response,
)
from pytest_sandbox.network.addresses import AddressVerdict, Authority
from pytest_sandbox.network.proxy import relay
from pytest_sandbox.network.proxy.config import (
    ConnectInterceptor,
    Decision,
    ProxyConfig,
    Resolver,
    RouteSocketFactory,
    SocketFactory,
)
from pytest_sandbox.network.proxy.decision import (
    NeedsResolution,
    Refusal,
    ResolutionFailed,
    Route,
    Rules,
    decide_destination,
    refusal_for_framing,
    split_target,
)
from pytest_sandbox.network.proxy.self_connection import self_connection
from pytest_sandbox.network.proxy.upstream import UpstreamConnection
from pytest_sandbox.network.proxy.watchdog import Watchdog, bounded
from pytest_sandbox.network.route_lookup import is_delivered_locally
from pytest_sandbox.policy.model import host_admitted

__all__ = ["EVENT_LOOPS", "EgressProxy", "run_on_loop"]

# The event loops the proxy can run on: the standard library's, and uvloop (libuv) when the optional
# ``fast`` extra is installed. "auto" takes uvloop when it imports and the stdlib loop otherwise.
EVENT_LOOPS = ("asyncio", "uvloop", "auto")
LOOP_ENVIRONMENT_VARIABLE = "PYTEST_SANDBOX_PROXY_LOOP"

# RFC 9110 §8.6: a user agent SHOULD send Content-Length for these even when the body is empty.
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
# RFC 9110 §9.2.2: safe to retry once on a stale keep-alive upstream connection.
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

_STREAM_LIMIT = 1024 * 1024
_CLASSIFY_CACHE_SIZE = 4096
# Fields this proxy writes itself: Host from the target (RFC 9112 §3.2.2), Content-Length from the decoded
# body, and Expect (the body is already read). Hop-by-hop fields go too (http.fields.end_to_end).
_REQUEST_FIELDS_REWRITTEN = frozenset({b"host", b"content-length", b"expect"})
_RESPONSE_FIELDS_REWRITTEN = frozenset({b"content-length"})


class _Refused(Exception):
    """Carries a :class:`Refusal` out of the I/O that found it, to the one place that answers it
    (with the authority it was about, when one was parsed)."""

    def __init__(self, refusal: Refusal, authority: Authority | None = None) -> None:
        super().__init__(refusal.detail)
        self.refusal = refusal
        self.authority = authority


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name not in EVENT_LOOPS:
        raise ValueError(f"unknown event loop {name!r}; use one of {', '.join(EVENT_LOOPS)}")
    if name in ("uvloop", "auto"):
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            if name == "uvloop":
                raise ValueError("event loop 'uvloop' asked for, but uvloop is not installed: "
                                 "pip install 'pytest-sandbox[fast]'") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_on_loop(main: Coroutine[Any, Any, None], loop: str | None = None) -> None:
    """``asyncio.run(main)`` on the named event loop (default: ``$PYTEST_SANDBOX_PROXY_LOOP``, else the
    standard library's); the proxy's code is the same on both."""
    name = loop or os.environ.get(LOOP_ENVIRONMENT_VARIABLE) or "asyncio"
    event_loop = _loop_factory(name)()
    try:  # what asyncio.run does (asyncio.Runner's loop_factory is Python 3.11+ only)
        asyncio.set_event_loop(event_loop)
        event_loop.run_until_complete(main)
    finally:
        try:
            pending = asyncio.all_tasks(event_loop)
            for task in pending:
                task.cancel()
            event_loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            event_loop.run_until_complete(event_loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            event_loop.close()


def _split(request: Request) -> tuple[Authority, str]:
    """The request's authority and upstream path (:func:`split_target`); a malformed target is refused."""
    split = split_target(request.method, request.target)
    if isinstance(split, Refusal):
        raise _Refused(split)
    return split


def _host_header(authority: Authority, default_port: int) -> str:
    host = f"[{authority.host}]" if ":" in authority.host else authority.host
    return host if authority.port == default_port else f"{host}:{authority.port}"


async def _connect_socket(sock: socket.socket, address: tuple[Any, ...]) -> None:
    """Non-blocking connect to a numeric socket address; no name resolution can happen here.

    ``loop.sock_connect`` would call getaddrinfo for an address whose family does not match the
    socket's, which for a hostname-shaped string would be a second resolution.
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        sock.connect(address)
        return
    except (BlockingIOError, InterruptedError):
        pass
    writable = loop.create_future()
    fd = sock.fileno()
    def wake() -> None:
        if not writable.done():
            writable.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        name = errno.errorcode.get(error, str(error))
        raise OSError(error, f"connect to {address[0]} port {address[1]}: {name}")


class EgressProxy:
    """The reference egress proxy. Serve it on a listening socket the caller made (in the lab's
    network namespace); the proxy takes ownership of that socket."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        resolver: Resolver,
        socket_factory: SocketFactory,
        connect_interceptor: ConnectInterceptor | None = None,
        route_socket_factory: RouteSocketFactory | None,
    ) -> None:
        self.config = config
        self._resolver = resolver
        self._socket_factory = socket_factory
        self._route_socket_factory = route_socket_factory
        self._connect_interceptor = connect_interceptor
        self._lock = threading.Lock()
        # Bounded (config.max_decisions): the oldest are dropped first and counted per reason, so the
        # evidence is summarised, never silently lost (``decision_summary``, ``decisions_since``).
        self._decisions: collections.deque[Decision] = collections.deque()
        self._dropped: collections.Counter[str] = collections.Counter()
        self._dropped_through = 0  # the highest seq no longer held (0: none dropped)
        self._seq = itertools.count(1)
        # Bytes buffered for requests and responses across every connection (config.memory_budget).
        # Touched only on the proxy's event loop; read from other threads as a plain int.
        self.buffered_bytes = 0
        self.peak_buffered_bytes = 0
        self._listening: set[tuple[str, int]] = set()  # as bound: a wildcard stays 0.0.0.0 / ::
        self._listening_ports: frozenset[int] = frozenset()
        self._classified: dict[str, AddressVerdict] = {}
        self._host_allowed: dict[str, bool] = {}
        self._allowed_ports = frozenset(config.allowed_ports)
        self._host_patterns = tuple(pattern.lower() for pattern in config.allowed_hosts)
        self._rules = Rules(self._allowed_ports, self._host_allowed_cached, self._classify, self._self_connection)
        self._client_tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Future[None] | None = None

    # --- public surface -----------------------------------------------------------------------

    @property
    def decisions(self) -> list[Decision]:
        """A copy of every decision still held, in order (safe to call from any thread). At most
        ``config.max_decisions``; what was dropped is in :attr:`decision_summary`."""
        with self._lock:
            return list(self._decisions)

    @property
    def decision_summary(self) -> dict[str, int]:
        """How many decisions were dropped from the bounded log, per reason code."""
        with self._lock:
            return dict(self._dropped)

    @property
    def last_seq(self) -> int:
        """The seq of the latest decision (0 before any): a mark for :meth:`decisions_since`."""
        with self._lock:
            return self._decisions[-1].seq if self._decisions else self._dropped_through

    def decisions_since(self, mark: int) -> list[Decision]:
        """Every decision with ``seq > mark``; raises LookupError if any of them was already dropped,
        so a judge can never mistake evicted evidence for an absent decision."""
        with self._lock:
            if mark < self._dropped_through:
                raise LookupError(
                    f"decisions {mark + 1}..{self._dropped_through} were dropped from the bounded log "
                    f"(max_decisions={self.config.max_decisions}; dropped per reason: {dict(self._dropped)})"
                )
            return [decision for decision in self._decisions if decision.seq > mark]

    def self_addresses(self) -> set[tuple[str, int]]:
        """The (address, port) pairs this proxy listens on, as bound; dialling one is a self-connection.

        A wildcard pair (``0.0.0.0`` or ``::``) stands for every address local to the namespace,
        judged when a request is checked (:mod:`pytest_sandbox.network.proxy.self_connection`).
        """
        with self._lock:
            return set(self._listening)

    async def serve(self, listen_sock: socket.socket) -> None:
        """Accept clients on ``listen_sock`` until cancelled."""
        server = await self._start_server(listen_sock)
        try:
            await server.serve_forever()
        finally:
            await self._shutdown(server)

    def start_in_thread(self, listen_sock: socket.socket) -> None:
        """Run the proxy on its own event loop in a daemon thread; returns once it accepts."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = self._loop.create_future()
            try:
                server = await self._start_server(listen_sock)
            except BaseException as error:
                failure.append(error)
                ready.set()
                raise
            ready.set()
            try:
                await self._stopping
            finally:
                await self._shutdown(server)

        def main() -> None:
            with contextlib.suppress(BaseException):
                run_on_loop(run())

        self._thread = threading.Thread(target=main, name="egress-proxy", daemon=True)
        self._thread.start()
        ready.wait(timeout=30)
        if failure:
            raise failure[0]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop a proxy started with ``start_in_thread``: close the listener and every connection."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is None or stopping is None or thread is None:
            return
        def wake() -> None:
            if not stopping.done():
                stopping.set_result(None)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(wake)
        thread.join(timeout)
        self._thread = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def _start_server(self, listen_sock: socket.socket) -> asyncio.Server:
        address = listen_sock.getsockname()
        host, port = str(address[0]), int(address[1])
        with self._lock:
            self._listening.add((str(ipaddress.ip_address(host.split("%")[0])), port))
            self._listening_ports = frozenset(listen_port for _address, listen_port in self._listening)
        return await asyncio.start_server(self._on_client, sock=listen_sock, limit=_STREAM_LIMIT)

    async def _shutdown(self, server: asyncio.Server) -> None:
        server.close()
        tasks = list(self._client_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._client_tasks.add(task)
        try:
            await self._serve_client(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, asyncio.TimeoutError):
            pass
        except OSError as error:  # e.g. EMFILE while answering: recorded, never an unhandled task error
            self._record(self._peer_name(writer), None, authority=None, action="error", status=0,
                         reason="client_io_failed", detail=f"{type(error).__name__}: {error}")
        finally:
            self._client_tasks.discard(task)
            writer.close()

    # --- decisions ----------------------------------------------------------------------------

    def _record(
        self, client: str, request: Request | None, *, authority: Authority | None, action: str,
        status: int, reason: str, detail: str, addresses: tuple[str, ...] = (),
    ) -> None:
        with self._lock:
            decisions = self._decisions
            if len(decisions) >= self.config.max_decisions:
                dropped = decisions.popleft()
                self._dropped[dropped.reason] += 1
                self._dropped_through = dropped.seq
            decisions.append(
                Decision(
                    seq=next(self._seq),
                    client=client,
                    method=request.method if request else "",
                    target=request.target if request else "",
                    host=authority.host if authority else None,
                    port=authority.port if authority else None,
                    action=action,
                    status=status,
                    reason=reason,
                    detail=detail,
                    addresses=addresses,
                )
            )

    def _record_refusal(
        self, client: str, request: Request | None, authority: Authority | None, refusal: Refusal,
        addresses: tuple[str, ...] = (),
    ) -> None:
        self._record(client, request, authority=authority, action=refusal.action, status=refusal.status,
                     reason=refusal.reason, detail=refusal.detail, addresses=refusal.addresses or addresses)

    # --- one client connection ----------------------------------------------------------------

    @staticmethod
    def _peer_name(writer: asyncio.StreamWriter) -> str:
        peer = writer.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def _budget(self, conn: _Client) -> Reserve:
        """The memory budget as ``reserve(n)`` for ``conn``'s readers: charged before bytes are kept,
        refused (503, the connection closed) when every connection together would exceed it."""
        budget = self.config.memory_budget

        def reserve(size: int) -> None:
            held = self.buffered_bytes + size
            if held > budget:
                raise _Refused(Refusal(503, "memory_budget", f"the proxy holds {self.buffered_bytes} buffered "
                                       f"bytes; {size} more would exceed memory_budget={budget}"))
            self.buffered_bytes = held
            conn.held += size
            if held > self.peak_buffered_bytes:
                self.peak_buffered_bytes = held

        return reserve

    def _release(self, conn: _Client) -> None:
        """Give back what ``conn`` was charged: its request has been answered (or it is gone)."""
        self.buffered_bytes -= conn.held
        conn.held = 0

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Client(name=self._peer_name(writer), reader=reader, writer=writer,
                       watchdog=Watchdog(asyncio.get_running_loop()))
        conn.budget = budget = self._budget(conn)
        conn.requests = RequestReader(reader, max_head=self.config.max_head, max_body=self.config.max_body,
                                      strict=self.config.strict_framing, reserve=budget,
                                      lax=self.config.lax_framing)
        idle_timeout, abort_client = self.config.idle_timeout, writer.transport.abort
        try:
            while True:
                conn.watchdog.arm(idle_timeout, abort_client)
                try:
                    request = await conn.requests.next_request()
                except FramingViolation as violation:
                    refusal = refusal_for_framing(violation)
                    self._record_refusal(conn.name, None, None, refusal)
                    await self._refuse(conn, refusal)
                    return
                except _Refused as refused:  # the memory budget, while reading the request
                    self._record_refusal(conn.name, None, None, refused.refusal)
                    await self._refuse(conn, refused.refusal)
                    return
                finally:
                    conn.watchdog.disarm()
                if request is None:
                    return
                if request.method == "CONNECT":
                    self._release(conn)  # a tunnel relays without buffering
                    await self._handle_connect(conn, request)
                    return
                if not await self._handle_forward(conn, request):
                    return
                self._release(conn)
        finally:
            self._release(conn)
            conn.watchdog.close()
            for upstream in conn.upstreams.values():
                upstream.close()

    async def _refuse(self, conn: _Client, refusal: Refusal, method: str = "") -> None:
        """Answer with ``{"error": reason, "detail": ...}``, ``Connection: close``, and close.

        To ``HEAD`` the answer carries no body (RFC 9110 §9.3.2): the same fields, Content-Length
        the length the body would have had (§8.6), and the reason code in ``X-Proxy-Error``.

        The connection is half-closed after the answer and the rest of the client's input is read
        and discarded, never parsed (RFC 9931: a refused CONNECT's trailing bytes are not a
        request). Discarding avoids a TCP reset that could destroy the answer in flight
        (RFC 9112 §9.6).
        """
        body = json.dumps({"error": refusal.reason, "detail": refusal.detail}, separators=(",", ":")).encode()
        headers = [("content-type", "application/json"), ("connection", "close")]
        if method == "HEAD":
            headers += [("x-proxy-error", refusal.reason), ("content-length", str(len(body)))]
            body = b""
        with contextlib.suppress(ConnectionError):
            await write_response(conn.writer, refusal.status, _REASON_PHRASES.get(refusal.status, "Error"),
                                 headers, body)
        await relay.linger_close(conn.reader, conn.writer)

    # --- absolute-form requests ---------------------------------------------------------------

    async def _handle_forward(self, conn: _Client, request: Request) -> bool:
        """Judge and forward one request; True when the client connection may carry another."""
        if conn.first_upstream is not None and not self.config.judge_every_request:
            return await self._forward_unjudged(conn, request, conn.first_upstream)
        authority: Authority | None = None
        addresses: tuple[str, ...] = ()
        try:
            authority, path, addresses = await self._admit(request)
            upstream, response = await self._exchange(conn, request, authority, path, addresses)
        except _Refused as refused:
            self._record_refusal(conn.name, request, authority or refused.authority, refused.refusal, addresses)
            await self._refuse(conn, refused.refusal, request.method)
            return False
        if conn.first_upstream is None:
            conn.first_upstream = upstream
        self._record(conn.name, request, authority=authority, action="allow", status=response.status,
                     reason="routed", detail=f"forwarded to {upstream.key[0]} port {upstream.key[1]}",
                     addresses=addresses)
        return await self._answer(conn, request, response)

    async def _forward_unjudged(self, conn: _Client, request: Request, upstream: UpstreamConnection) -> bool:
        """Weakened mode: the request rides the first request's upstream, unjudged (the hole)."""
        split = split_target(request.method, request.target)
        path = request.target if isinstance(split, Refusal) else split[1]
        data = _upstream_request(request, (request.header("host") or "").encode("latin-1"), path)
        try:
            response = await upstream.round_trip(data, request.method)
        except (FramingViolation, OSError, asyncio.IncompleteReadError) as error:
            await self._refuse(conn, Refusal(502, "upstream_protocol_error", str(error)), request.method)
            return False
        self._record(conn.name, request, authority=None, action="allow", status=response.status,
                     reason="unjudged", detail="judge_every_request=False: rode the first upstream",
                     addresses=(upstream.key[0],))
        return await self._answer(conn, request, response)

    async def _admit(self, request: Request) -> tuple[Authority, str, tuple[str, ...]]:
        """A non-CONNECT request's authority, upstream path and checked addresses to dial; raises
        :class:`_Refused` (carrying the authority once parsed) for anything refused."""
        authority, path = _split(request)
        try:
            return authority, path, await self._destination(authority)
        except _Refused as refused:
            raise _Refused(refused.refusal, authority) from None

    def _host_allowed_cached(self, host: str) -> bool:
        """Whether the canonical ``host`` matches an allowlist pattern, cached per host."""
        allowed = self._host_allowed.get(host)
        if allowed is None:
            allowed = host_admitted(host, self._host_patterns)
            if len(self._host_allowed) < _CLASSIFY_CACHE_SIZE:
                self._host_allowed[host] = allowed
        return allowed

    def _classify(self, address: str) -> AddressVerdict:
        verdict = self._classified.get(address)
        if verdict is None:
            verdict = self.config.classify(address)
            if len(self._classified) < _CLASSIFY_CACHE_SIZE:
                self._classified[address] = verdict
        return verdict

    async def _destination(self, authority: Authority) -> tuple[str, ...]:
        """The checked addresses to dial for ``authority`` (:func:`decide_destination`); a name is
        resolved once, with the injected resolver, only after the policy admitted it."""
        decided = decide_destination(authority, None, self._rules)
        if type(decided) is NeedsResolution:
            try:
                answers = list(await bounded(self._resolver(decided.host), self.config.resolve_timeout))
            except Exception as error:
                decided = decide_destination(authority, ResolutionFailed(f"{type(error).__name__}: {error}"),
                                             self._rules)
            else:
                decided = decide_destination(authority, answers, self._rules)
        if type(decided) is Route:
            return decided.addresses
        if isinstance(decided, Refusal):
            raise _Refused(decided)
        raise AssertionError(f"decide_destination asked to resolve twice: {decided}")

    def _self_connection(self, address: str, port: int) -> str | None:
        """Why dialling ``address`` port ``port`` would reach this proxy, or None.

        Unwrapped and wildcard-aware (:func:`pytest_sandbox.network.proxy.self_connection.self_connection`); costs
        one set lookup unless ``port`` is one this proxy listens on.
        """
        if port not in self._listening_ports:
            return None
        return self_connection(address, port, self.self_addresses(), self._is_local_address)

    def _is_local_address(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether a connection to ``address`` from where this proxy dials is received there.

        Asked at check time, so addresses added after the proxy started count. First a bind(2)
        probe with a socket from the factory (EADDRNOTAVAIL = not an address of the namespace);
        then, for an address that does not bind, the routing table (RTM_GETROUTE, see
        :mod:`pytest_sandbox.network.route_lookup`): an AnyIP route (``local ::/0 dev lo``) delivers IPv6
        addresses that no interface has to a wildcard listener, and bind(2) does not see those.
        ``route_socket_factory=None`` asks only the probe (that misses IPv6 AnyIP routes): it exists to
        build the weakened proxy the tests must catch, so every caller has to pass it explicitly.
        Anything that stops either question from being answered counts as local (deny: fail closed).
        """
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        try:
            probe = self._socket_factory(family)
        except OSError:
            return True
        with probe:
            if probe.family != family:
                return True
            try:
                probe.bind((str(address), 0))
            except OSError as error:
                if error.errno != errno.EADDRNOTAVAIL:
                    return True
            else:
                return True
        if self._route_socket_factory is None:
            return False
        try:
            with self._route_socket_factory() as routes:
                return is_delivered_locally(routes, address)
        except OSError:
            return True

    async def _dial_socket(self, addresses: tuple[str, ...], port: int) -> tuple[socket.socket, str]:
        """A socket from the factory, connected to the first reachable checked address."""
        failures: list[str] = []
        for address in addresses:
            ip = ipaddress.ip_address(address)
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            sockaddr: tuple[Any, ...] = (address, port, 0, 0) if ip.version == 6 else (address, port)
            try:
                sock = self._socket_factory(family)
            except Exception as error:  # EMFILE, a closed lab helper: answered 502 and recorded, not raised
                failures.append(f"{address}: no socket to dial from: {type(error).__name__}: {error}")
                continue
            try:
                await bounded(_connect_socket(sock, sockaddr), self.config.connect_timeout)
            except (OSError, TimeoutError, asyncio.TimeoutError) as error:
                sock.close()
                failures.append(f"{address}: {error or type(error).__name__}")
                continue
            return sock, address
        raise _Refused(Refusal(502, "upstream_unreachable", f"port {port}: " + "; ".join(failures), addresses))

    async def _dial(self, conn: _Client, addresses: tuple[str, ...], port: int) -> UpstreamConnection:
        sock, address = await self._dial_socket(addresses, port)
        key = (address, port)
        try:
            _, upstream = await asyncio.get_running_loop().create_connection(
                lambda: UpstreamConnection(key, max_body=self.config.max_response_body, reserve=conn.budget),
                sock=sock)
        except OSError as error:
            sock.close()
            raise _Refused(Refusal(502, "upstream_unreachable", f"{address} port {port}: {error}",
                                   addresses)) from None
        return upstream

    async def _exchange(
        self, conn: _Client, request: Request, authority: Authority, path: str, addresses: tuple[str, ...],
    ) -> tuple[UpstreamConnection, Response]:
        """Send the request to an upstream for one of ``addresses`` and read its response.

        An upstream connection is reused only for the same checked (address, port).
        """
        data = _upstream_request(request, _host_header(authority, 80).encode("ascii"), path)
        port = authority.port
        for attempt in range(2):
            upstream = _idle_upstream(conn, addresses, port)
            reused = upstream is not None
            if upstream is None:
                upstream = await self._dial(conn, addresses, port)
            conn.watchdog.arm(self.config.upstream_timeout, upstream.abort)
            try:
                response = await upstream.round_trip(data, request.method)
            except FramingViolation as violation:
                upstream.close()
                raise _Refused(Refusal(502, "upstream_protocol_error",
                                       f"upstream {upstream.key[0]} sent bad framing: {violation}")) from None
            except _Refused:  # the memory budget, mid-response: this upstream's framing is lost
                upstream.close()
                raise
            except (OSError, asyncio.IncompleteReadError) as error:
                upstream.close()
                if conn.watchdog.expired:
                    raise _Refused(Refusal(504, "upstream_timeout", f"no complete response from "
                                           f"{upstream.key[0]} within {self.config.upstream_timeout} s")) from None
                if reused and attempt == 0 and request.method in _IDEMPOTENT_METHODS:
                    continue  # a stale keep-alive connection: dial afresh once
                failure = f"{type(error).__name__}: {error}"
                raise _Refused(Refusal(502, "upstream_unreachable",
                                       f"upstream {upstream.key[0]} failed: {failure}")) from None
            finally:
                conn.watchdog.disarm()
            if response.keep_alive:
                conn.upstreams[upstream.key] = upstream
            else:
                upstream.close()
            return upstream, response
        raise AssertionError("unreachable")

    async def _answer(self, conn: _Client, request: Request, response: Response) -> bool:
        keep_alive = request.keep_alive
        fields = response.raw_headers or _encode_fields(response.headers)
        parts = [b"HTTP/1.1 %d %s\r\n" % (response.status, response.reason.encode("latin-1"))]
        # Proxy-* response fields are passed on, as they always were (only the request drops them).
        for name, value in end_to_end(fields, rewritten=_RESPONSE_FIELDS_REWRITTEN, drop_proxy_fields=False):
            parts += (name, b": ", value, b"\r\n")
        if request.method == "HEAD" or response.status in (204, 304):
            # RFC 9110 §8.6: a HEAD/304 response's Content-Length describes the body it omits.
            parts += (b"content-length: %s\r\n" % value for name, value in fields if name == b"content-length")
        else:
            parts.append(b"content-length: %d\r\n" % len(response.body))
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", response.body)
        writer = conn.writer
        writer.write(b"".join(parts))
        if writer.transport.get_write_buffer_size() > relay.RELAY_CHUNK:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        if not keep_alive:
            await relay.linger_close(conn.reader, writer)
        return keep_alive

    # --- CONNECT --------------------------------------------------------------------------------

    async def _handle_connect(self, conn: _Client, request: Request) -> None:
        authority: Authority | None = None
        addresses: tuple[str, ...] = ()
        try:
            authority, _ = _split(request)
            handler = self._connect_interceptor(authority.host, authority.port) \
                if self._connect_interceptor is not None else None
            if handler is not None:
                if conn.requests.leftover():
                    # The interceptor speaks TLS from its first byte; bytes sent before our 200
                    # (RFC 9931 optimistic data) could never be replayed into that handshake.
                    raise _Refused(Refusal(400, "framing:connect-early-data",
                                           "bytes sent before 200 Connection Established on an intercepted CONNECT"))
                self._record(conn.name, request, authority=authority, action="intercept", status=200,
                             reason="intercepted", detail="handed to the connect interceptor")
                conn.writer.write(_CONNECTION_ESTABLISHED)
                await conn.writer.drain()
                await handler(conn.reader, conn.writer)
                return
            addresses = await self._destination(authority)
            upstream_sock, address = await self._dial_socket(addresses, authority.port)
        except _Refused as refused:
            self._record_refusal(conn.name, request, authority, refused.refusal, addresses)
            await self._refuse(conn, refused.refusal)
            return
        self._record(conn.name, request, authority=authority, action="allow", status=200, reason="routed",
                     detail=f"tunnel to {address} port {authority.port}", addresses=addresses)
        with upstream_sock:
            await self._tunnel(conn, upstream_sock)

    async def _tunnel(self, conn: _Client, upstream_sock: socket.socket) -> None:
        """Answer 200 and relay bytes both ways until both sides are done.

        Bytes the client sent after its CONNECT head are tunnel payload and go upstream first;
        they are never parsed as HTTP. The relay does no per-chunk work beyond moving bytes:
        zero-copy ``splice(2)`` through a pipe when the platform has it, stream copies otherwise.
        """
        transport: Any = conn.writer.transport  # asyncio's or uvloop's (see below)
        conn.writer.write(_CONNECTION_ESTABLISHED)
        await conn.writer.drain()
        early = conn.requests.leftover()
        loop = asyncio.get_running_loop()
        if early:
            await loop.sock_sendall(upstream_sock, early)
        # Duck-typed: uvloop's transports pause and resume like asyncio's but are not ReadTransport
        # subclasses, and their socket is a PseudoSocket that still has a fileno().
        if relay.SPLICE_AVAILABLE and callable(getattr(transport, "pause_reading", None)):
            transport.pause_reading()
            if not relay.stream_buffered(conn.reader):
                client_sock = transport.get_extra_info("socket")
                await relay.splice_relay(loop, client_sock.fileno(), upstream_sock)
                return
            transport.resume_reading()
        reader, writer = await asyncio.open_connection(sock=upstream_sock.dup(), limit=_STREAM_LIMIT)
        try:
            await relay.pump_both_ways(conn.reader, conn.writer, reader, writer)
        finally:
            writer.close()


_CONNECTION_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
_REASON_PHRASES = {
    400: "Bad Request", 403: "Forbidden", 413: "Content Too Large", 431: "Request Header Fields Too Large",
    501: "Not Implemented", 502: "Bad Gateway", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


@dataclass
class _Client:
    """One client connection and what the proxy keeps for it."""

    name: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    watchdog: Watchdog
    requests: RequestReader = field(init=False)
    upstreams: dict[tuple[str, int], UpstreamConnection] = field(default_factory=dict)  # idle, by checked key
    first_upstream: UpstreamConnection | None = None  # weakened mode: where later requests ride
    held: int = 0  # bytes charged to the proxy's memory budget for the request in progress
    budget: Reserve | None = None  # the proxy's memory budget as charged to this connection


def _idle_upstream(conn: _Client, addresses: tuple[str, ...], port: int) -> UpstreamConnection | None:
    """An idle upstream connection of ``conn`` to one of the checked ``addresses`` (taken out of the idle
    set), or None. Connections that closed or sent bytes while idle are dropped, never reused."""
    for address in addresses:
        upstream = conn.upstreams.pop((address, port), None)
        if upstream is not None:
            if upstream.usable:
                return upstream
            upstream.close()
    return None


def _encode_fields(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((name.encode("ascii"), value.encode("latin-1")) for name, value in headers)


def _upstream_request(request: Request, host: bytes, path: str) -> bytes:
    """The request in origin-form for the next hop: Host from the target (RFC 9112 §3.2.2),
    hop-by-hop and Proxy-* fields removed (RFC 9110 §7.6.1), the body framed by Content-Length."""
    fields = request.raw_headers or _encode_fields(request.headers)
    parts = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (request.method.encode("ascii"), path.encode("latin-1"), host)]
    for name, value in end_to_end(fields, rewritten=_REQUEST_FIELDS_REWRITTEN, drop_proxy_fields=True):
        parts += (name, b": ", value, b"\r\n")
    body = request.body
    if body or request.method in _METHODS_WITH_BODY or any(name == b"content-length" for name, _ in fields):
        parts.append(b"content-length: %d\r\n" % len(body))
    parts += (b"\r\n", body)
    return b"".join(parts)
