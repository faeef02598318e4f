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

A keep-alive request to an address literal whose upstream connection is open is framed, judged and
forwarded from protocol callbacks, one pass of the event loop per hop (:class:`_ClientConnection`); every
other request runs the coroutine path (``_on_client``), which frames and judges with the same functions.

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
import functools
import ipaddress
import itertools
import json
import os
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, fields
from typing import Any, Final

from pytest_sandbox.http.fields import end_to_end
from pytest_sandbox.http.framing import (
    HEAD_END,
    FramingViolation,
    check_request_head,
    first_bare_line_ending,
    frozen_instance,
)
from pytest_sandbox.http.incremental import Response, decode_headers
from pytest_sandbox.http.streams import Request, RequestReader, Reserve, write_response
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
from pytest_sandbox.network.proxy.upstream import Outcome, UpstreamConnection
from pytest_sandbox.network.proxy.watchdog import Watchdog, bounded
from pytest_sandbox.network.route_lookup import is_delivered_locally
from pytest_sandbox.policy.model import host_admitted
from pytest_sandbox.scheduling import ask_short_slice

__all__ = ["DEFAULT_EVENT_LOOP", "EVENT_LOOPS", "EgressProxy", "run_on_loop"]

# The event loops the proxy can run on: the standard library's, and uvloop (libuv) when the optional
# ``fast`` extra is installed. The default, "auto", takes uvloop when it imports and the stdlib loop otherwise
# (issue #12: uvloop is what holds keep-alive GETs at squid's rate on a busy 2-core runner; benchmarks/README.md).
# It was "asyncio" until the TLS linger ran on uvloop too (inference/tls.py can_linger): before that, a refusal
# answered while the client was still writing into an intercepted tunnel could be destroyed by a RST on uvloop.
EVENT_LOOPS = ("asyncio", "uvloop", "auto")
DEFAULT_EVENT_LOOP = "auto"
LOOP_ENVIRONMENT_VARIABLE = "PYTEST_SANDBOX_PROXY_LOOP"

# RFC 9110 §8.6: a user agent SHOULD send Content-Length for these even when the body is empty.
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
# RFC 9110 §9.2.2: safe to retry once on a stale keep-alive upstream connection.
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# One decision as the log holds it: Decision's fields, in order (checked below, so the two cannot drift).
_DecisionRow = tuple[int, str, str, str, str | None, int | None, str, int, str, str, tuple[str, ...]]
_DECISION_FIELDS = ("seq", "client", "method", "target", "host", "port", "action", "status", "reason", "detail",
                    "addresses")
if tuple(item.name for item in fields(Decision)) != _DECISION_FIELDS:  # pragma: no cover
    raise ImportError(f"Decision's fields changed; update _DecisionRow: {[item.name for item in fields(Decision)]}")
_ROW_SEQ: Final = 0  # where a row holds Decision.seq and Decision.reason (checked below)
_ROW_REASON: Final = 8
if (_DECISION_FIELDS[_ROW_SEQ], _DECISION_FIELDS[_ROW_REASON]) != ("seq", "reason"):  # pragma: no cover
    raise ImportError("_ROW_SEQ/_ROW_REASON no longer point at Decision's seq and reason")

_STREAM_LIMIT = 1024 * 1024
_CLASSIFY_CACHE_SIZE = 4096
# Fields this proxy writes itself: Host from the target (RFC 9112 §3.2.2), Content-Length from the decoded
# body, and Expect (the body is already read). Hop-by-hop fields go too (http.fields.end_to_end).
_REQUEST_FIELDS_REWRITTEN = frozenset({b"host", b"content-length", b"expect"})
_RESPONSE_FIELDS_REWRITTEN = frozenset({b"content-length"})
# The steps of the classic (coroutine) path that the one-pass path (``_ClientConnection``) does inline. A
# subclass that replaces any of them (the deliberately weakened proxies in tests/ do) gets the classic
# path for every request, so what it replaced is what runs.
_ONE_PASS_REPLACES = ("_on_client", "_serve_client", "_handle_forward", "_admit", "_destination", "_exchange",
                      "_answer", "_refuse")


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
    """``asyncio.run(main)`` on the named event loop (default: ``$PYTEST_SANDBOX_PROXY_LOOP``, else
    :data:`DEFAULT_EVENT_LOOP`: uvloop when installed, the standard library's otherwise)."""
    name = loop or os.environ.get(LOOP_ENVIRONMENT_VARIABLE) or DEFAULT_EVENT_LOOP
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


def _short_slice() -> None:
    """Ask the scheduler for a short slice for the thread running the proxy's event loop.

    A keep-alive request is a relay of wake-ups: client -> proxy -> origin -> proxy -> client, each a
    few tens of microseconds of work. On a busy machine a woken task with the default slice waits for the
    running task's slice to end; since Linux 6.12 EEVDF lets a task that asked for a shorter slice
    (``sched_attr.sched_runtime``) preempt on wake-up. It is the spawner's request
    (:func:`pytest_sandbox.scheduling.ask_short_slice`: same policy and nice, the slice only, reset
    for every thread and process it starts, so CONNECT tunnel threads keep the default). A hint, not a
    security step: an older kernel ignores it, and no failure here stops the proxy.
    """
    with contextlib.suppress(Exception):
        ask_short_slice()


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
        one_pass: bool = True,
    ) -> None:
        self.config = config
        self._resolver = resolver
        self._socket_factory = socket_factory
        self._route_socket_factory = route_socket_factory
        self._connect_interceptor = connect_interceptor
        self._lock = threading.Lock()
        # Bounded (config.max_decisions): the oldest are dropped first and counted per reason, so the
        # evidence is summarised, never silently lost (``decision_summary``, ``decisions_since``).
        # Held as plain tuples in Decision's field order (a frozen dataclass costs a setattr per field, on
        # every request); the Decision objects are built when the log is read.
        self._decisions: collections.deque[_DecisionRow] = collections.deque()
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
        self._one_pass_clients: set[_ClientConnection] = set()
        # ``one_pass=False`` serves every request on the classic path (a test compares the two).
        replaced = [step for step in _ONE_PASS_REPLACES if getattr(type(self), step) is not getattr(EgressProxy, step)]
        self._one_pass = (one_pass and config.strict_framing and config.judge_every_request
                          and not config.lax_framing and not replaced)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Future[None] | None = None

    # --- public surface -----------------------------------------------------------------------

    @property
    def decisions(self) -> list[Decision]:
        """A copy of every decision still held, in order (safe to call from any thread). At most
        ``config.max_decisions``; what was dropped is in :attr:`decision_summary`."""
        with self._lock:
            return [Decision(*row) for row in self._decisions]

    @property
    def decision_summary(self) -> dict[str, int]:
        """How many decisions were dropped from the bounded log, per reason code."""
        with self._lock:
            return dict(self._dropped)

    @property
    def last_seq(self) -> int:
        """The seq of the latest decision (0 before any): a mark for :meth:`decisions_since`."""
        with self._lock:
            return self._decisions[-1][_ROW_SEQ] if self._decisions else self._dropped_through

    def decisions_since(self, mark: int) -> list[Decision]:
        """Every decision with ``seq > mark``; raises LookupError if any of them was already dropped,
        so a judge can never mistake evicted evidence for an absent decision."""
        with self._lock:
            if mark < self._dropped_through:
                raise LookupError(
                    f"decisions {mark + 1}..{self._dropped_through} were dropped from the bounded log "
                    f"(max_decisions={self.config.max_decisions}; dropped per reason: {dict(self._dropped)})"
                )
            return [Decision(*row) for row in self._decisions if row[_ROW_SEQ] > mark]

    def self_addresses(self) -> set[tuple[str, int]]:
        """The (address, port) pairs this proxy listens on, as bound; dialling one is a self-connection.

        A wildcard pair (``0.0.0.0`` or ``::``) stands for every address local to the namespace,
        judged when a request is checked (:mod:`pytest_sandbox.network.proxy.self_connection`).
        """
        with self._lock:
            return set(self._listening)

    async def serve(self, listen_sock: socket.socket) -> None:
        """Accept clients on ``listen_sock`` until cancelled."""
        _short_slice()
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
            _short_slice()
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
        return await asyncio.get_running_loop().create_server(lambda: _ClientConnection(self), sock=listen_sock)

    async def _shutdown(self, server: asyncio.Server) -> None:
        server.close()
        for client in list(self._one_pass_clients):
            client.abort()
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
                self._dropped[dropped[_ROW_REASON]] += 1
                self._dropped_through = dropped[_ROW_SEQ]
            decisions.append((
                next(self._seq), client, request.method if request else "", request.target if request else "",
                authority.host if authority else None, authority.port if authority else None,
                action, status, reason, detail, addresses,
            ))

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
        await self._linger(conn)

    @staticmethod
    async def _linger(conn: _Client) -> None:
        """Half-close ``conn`` and discard what it still sends (:func:`relay.linger_close`); a one-pass
        connection first hands its unread bytes (and every later one) to ``conn.reader``."""
        if conn.to_streams is not None:
            conn.to_streams()
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
            return await self._refuse_request(conn, request, authority or refused.authority, refused.refusal,
                                              addresses)
        if conn.first_upstream is None:
            conn.first_upstream = upstream
        self._record(conn.name, request, authority=authority, action="allow", status=response.status,
                     reason="routed", detail=f"forwarded to {upstream.key[0]} port {upstream.key[1]}",
                     addresses=addresses)
        return await self._answer(conn, request, response)

    async def _refuse_request(self, conn: _Client, request: Request, authority: Authority | None, refusal: Refusal,
                              addresses: tuple[str, ...]) -> bool:
        """Record and answer a refused request (the connection then closes): False."""
        self._record_refusal(conn.name, request, authority, refusal, addresses)
        await self._refuse(conn, refusal, request.method)
        return False

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
            except (FramingViolation, _Refused, OSError, asyncio.IncompleteReadError) as error:
                refusal = self._upstream_failed(conn, upstream, error, reused and attempt == 0 and
                                                request.method in _IDEMPOTENT_METHODS)
                if refusal is None:
                    continue  # a stale keep-alive connection: dial afresh once
                raise _Refused(refusal) from None
            finally:
                conn.watchdog.disarm()
            if response.keep_alive:
                conn.upstreams[upstream.key] = upstream
            else:
                upstream.close()
            return upstream, response
        raise AssertionError("unreachable")

    def _upstream_failed(self, conn: _Client, upstream: UpstreamConnection, error: BaseException,
                         retry: bool) -> Refusal | None:
        """Close ``upstream`` after ``error`` and say how the request is answered; None: dial afresh once
        (``retry``: a reused connection went stale and the method is idempotent, RFC 9110 §9.2.2)."""
        upstream.close()
        if isinstance(error, FramingViolation):
            return Refusal(502, "upstream_protocol_error", f"upstream {upstream.key[0]} sent bad framing: {error}")
        if isinstance(error, _Refused):  # the memory budget, mid-response: this upstream's framing is lost
            return error.refusal
        if conn.watchdog.expired:
            return Refusal(504, "upstream_timeout", f"no complete response from {upstream.key[0]} within "
                           f"{self.config.upstream_timeout} s")
        if retry:
            return None
        failure = f"{type(error).__name__}: {error}"
        return Refusal(502, "upstream_unreachable", f"upstream {upstream.key[0]} failed: {failure}")

    async def _answer(self, conn: _Client, request: Request, response: Response) -> bool:
        keep_alive = request.keep_alive
        writer = conn.writer
        writer.write(_answer_bytes(request, response, keep_alive))
        if writer.transport.get_write_buffer_size() > relay.RELAY_CHUNK:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        if not keep_alive:
            await self._linger(conn)
        return keep_alive

    # --- the one-pass path (see _ClientConnection) --------------------------------------------------

    def _forward_one_pass(self, client: _ClientConnection, conn: _Client, request: Request) -> None:
        """Judge ``request`` and, when that needs no resolution and an idle upstream connection to a checked
        address is open, send it there now; the answer is written from the upstream's callback
        (:meth:`_answered_one_pass`). Everything else (refusals, names, dialling) is :meth:`_handle_forward`
        in a task: the same decision, made by the same pure functions."""
        split = split_target(request.method, request.target)
        if type(split) is tuple:
            authority, path = split
            decided = decide_destination(authority, None, self._rules)
            if type(decided) is Route:
                upstream = _idle_upstream(conn, decided.addresses, authority.port)
                if upstream is not None:
                    data = _upstream_request(request, _host_header(authority, 80).encode("ascii"), path)
                    conn.watchdog.arm(self.config.upstream_timeout, upstream.abort)
                    upstream.send(data, request.method, functools.partial(
                        self._answered_one_pass, client, conn, request, authority, decided.addresses, upstream))
                    return
        client.spawn(self._forward_in_task(client, conn, request))

    def _answered_one_pass(self, client: _ClientConnection, conn: _Client, request: Request, authority: Authority,
                           addresses: tuple[str, ...], upstream: UpstreamConnection, outcome: Outcome) -> None:
        conn.watchdog.disarm()
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, (FramingViolation, _Refused, OSError, asyncio.IncompleteReadError)):
                upstream.close()
                client.abort()
                raise outcome
            refusal = self._upstream_failed(conn, upstream, outcome, request.method in _IDEMPOTENT_METHODS)
            if refusal is None:  # stale: the task dials afresh (the stale connection is gone from the idle set)
                client.spawn(self._forward_in_task(client, conn, request))
            else:
                client.spawn(self._refuse_in_task(client, conn, request, authority, refusal, addresses))
            return
        response = outcome
        if response.keep_alive:
            conn.upstreams[upstream.key] = upstream
        else:
            upstream.close()
        self._record(conn.name, request, authority=authority, action="allow", status=response.status,
                     reason="routed", detail=f"forwarded to {upstream.key[0]} port {upstream.key[1]}",
                     addresses=addresses)
        keep_alive = request.keep_alive
        client.write(_answer_bytes(request, response, keep_alive))
        if not keep_alive:
            client.spawn(self._finish_in_task(client, conn, self._linger(conn)))
        elif client.write_buffer_size() > relay.RELAY_CHUNK:
            client.spawn(self._finish_in_task(client, conn, _drained(conn.writer)))
        else:
            self._release(conn)
            client.ready()

    async def _forward_in_task(self, client: _ClientConnection, conn: _Client, request: Request) -> None:
        await self._finish_in_task(client, conn, self._handle_forward(conn, request))

    async def _refuse_in_task(self, client: _ClientConnection, conn: _Client, request: Request,
                              authority: Authority, refusal: Refusal, addresses: tuple[str, ...]) -> None:
        await self._finish_in_task(client, conn, self._refuse_request(conn, request, authority, refusal, addresses))

    async def _finish_in_task(self, client: _ClientConnection, conn: _Client,
                              step: Coroutine[Any, Any, bool | None]) -> None:
        """Run the rest of a request's handling; then the connection takes its next request (``step`` gave
        True) or ends, as :meth:`_on_client` ends a classic one."""
        keep_alive = False
        try:
            keep_alive = bool(await step)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, asyncio.TimeoutError):
            pass
        except OSError as error:
            self._record(conn.name, None, authority=None, action="error", status=0,
                         reason="client_io_failed", detail=f"{type(error).__name__}: {error}")
        finally:
            if keep_alive:
                self._release(conn)
                client.ready()
            else:
                client.close()

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
        they are never parsed as HTTP. The relay does no per-chunk work beyond moving bytes: a thread per
        direction, off the event loop (``relay.thread_relay``), or stream copies when bytes the client sent
        already sit in the reader.
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
        if relay.THREAD_RELAY and callable(getattr(transport, "pause_reading", None)):
            transport.pause_reading()
            if not relay.stream_buffered(conn.reader):
                client_sock = transport.get_extra_info("socket")
                await relay.thread_relay(loop, client_sock.fileno(), upstream_sock)
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
    to_streams: Callable[[], None] | None = None  # one-pass connections: hand unread bytes to ``reader``


async def _drained(writer: asyncio.StreamWriter) -> bool:
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    return True


def _answer_bytes(request: Request, response: Response, keep_alive: bool) -> bytes:
    """The response as this proxy forwards it: hop-by-hop fields dropped (RFC 9110 §7.6.1), the body framed by
    Content-Length, ``Connection: close`` when the client connection ends after it."""
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
    return b"".join(parts)


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


class _ClientConnection(asyncio.StreamReaderProtocol):
    """One client connection. Requests are taken in one pass of the event loop where that is possible;
    everything else runs on the classic coroutine path, which reads the same bytes through ``StreamReader``.

    **One pass.** ``data_received`` frames the request strictly (``check_request_head``, the same pure
    function ``RequestReader`` calls) and :meth:`EgressProxy._forward_one_pass` judges it and writes it to an
    idle upstream connection; the upstream's ``data_received`` completes the response and the answer is
    written from there. A keep-alive GET thus costs two callbacks and no task wake-up; on asyncio streams
    each ``await`` of a read is a further pass of the loop (four per request), most of the proxy's CPU.

    **Classic.** A request whose bytes the one-pass framer does not take (any framing violation, a head or
    body not yet complete when its head is, chunked, CONNECT, the memory budget) hands the whole connection
    to :meth:`EgressProxy._on_client` with every unconsumed byte, that request's included: it is framed,
    judged, refused or relayed exactly as before, and the connection stays classic. A request the framer took
    but that needs a name resolved, an upstream dialled or a refusal answered runs :meth:`_handle_forward`
    in a task and comes back to one pass if the connection stays open. Refusals and ``Connection: close``
    answers linger (:func:`relay.linger_close`) on ``StreamReader`` like the classic path's.

    Deadlines are the classic path's: the idle timeout runs from the end of one request until the next is
    complete, the upstream timeout while its response is awaited (one :class:`Watchdog`). While a request is
    in flight, bytes the client sends are buffered, up to ``_STREAM_LIMIT`` before reading is paused.
    """

    def __init__(self, proxy: EgressProxy) -> None:
        loop = asyncio.get_running_loop()
        self._reader = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
        super().__init__(self._reader, loop=loop)
        self._event_loop = loop
        self._client_transport: Any = None
        self._proxy = proxy
        self._buffer = bytearray()
        self._conn: _Client | None = None  # set while the connection is one-pass
        self._streaming = False  # a refusal or close is lingering: client bytes go to the StreamReader
        self._busy = False  # a request is being answered
        self._eof = False
        self._paused = False
        self._writer: asyncio.StreamWriter | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._client_transport = transport
        self._writer = writer = asyncio.StreamWriter(transport, self, self._reader, self._event_loop)  # type: ignore[arg-type]
        proxy = self._proxy
        if not proxy._one_pass:
            self._to_classic()
            return
        conn = _Client(name=proxy._peer_name(writer), reader=self._reader, writer=writer,
                       watchdog=Watchdog(self._event_loop))
        conn.budget = proxy._budget(conn)
        conn.to_streams = self._to_streams
        self._conn = conn
        proxy._one_pass_clients.add(self)
        self.ready()

    # --- bytes in -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._conn is None or self._streaming:
            super().data_received(data)
            return
        self._buffer += data
        if not self._busy:
            self._take()
        elif len(self._buffer) > _STREAM_LIMIT and not self._paused:
            self._paused = True
            self._pause_reading(True)

    def eof_received(self) -> bool:
        if self._conn is None or self._streaming:
            return bool(super().eof_received())
        self._eof = True
        if not self._busy:
            self.close()  # between requests, or inside one (the classic path closes on both, silently)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._leave_one_pass()
        super().connection_lost(exc)
        self._client_transport = None

    def _take(self) -> None:
        """Frame the next request from the buffer and answer it, or wait for more bytes, or go classic."""
        conn, config, buffer = self._conn, self._proxy.config, self._buffer
        assert conn is not None
        end = buffer.find(HEAD_END)
        if end == -1:
            # The classic reader's early refusals (head too large, a bare CR or LF) are its to answer.
            if len(buffer) > config.max_head or first_bare_line_ending(bytes(buffer)) is not None:
                self._to_classic()
            return
        size = end + len(HEAD_END)
        head_bytes = bytes(buffer[:size])
        try:
            head = check_request_head(head_bytes, max_head=config.max_head)
        except FramingViolation:
            self._to_classic()
            return
        kind, length = head.body_framing
        if head.method == "CONNECT" or kind == "chunked" or length > config.max_body or len(buffer) < size + length:
            self._to_classic()
            return
        assert conn.budget is not None
        try:
            conn.budget(size + length)
        except _Refused:
            self._to_classic()
            return
        raw = bytes(buffer[: size + length]) if length else head_bytes
        del buffer[: size + length]
        request = frozen_instance(Request, method=head.method, target=head.target, http_version=head.http_version,
                                  headers=decode_headers(head.headers), body=raw[size:], raw=raw,
                                  raw_headers=head.headers)
        self._busy = True
        conn.watchdog.disarm()
        self._proxy._forward_one_pass(self, conn, request)

    # --- what the proxy calls ---------------------------------------------------------------------

    def ready(self) -> None:
        """The last request is answered and the connection stays open: take the next one."""
        conn = self._conn
        if conn is None or self._streaming:
            return
        self._busy = False
        assert self.transport is not None
        conn.watchdog.arm(self._proxy.config.idle_timeout, self.transport.abort)
        if self._paused:
            self._paused = False
            self._pause_reading(False)
        if self._buffer:
            self._take()
        elif self._eof:
            self.close()

    def spawn(self, step: Coroutine[Any, Any, None]) -> None:
        """Run the rest of a request in a task the proxy cancels on shutdown."""
        task = self._event_loop.create_task(step)
        tasks = self._proxy._client_tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def transport(self) -> Any:
        return self._client_transport

    # --- leaving the one-pass path ------------------------------------------------------------------

    def _pause_reading(self, pause: bool) -> None:
        with contextlib.suppress(Exception):
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _leave_one_pass(self) -> None:
        conn = self._conn
        assert conn is not None
        self._conn = None
        self._proxy._one_pass_clients.discard(self)
        self._proxy._release(conn)
        conn.watchdog.close()
        for upstream in conn.upstreams.values():
            upstream.close()
        conn.upstreams.clear()

    def _to_streams(self) -> None:
        """Every unread byte, and every later one, goes to ``StreamReader`` (a refusal's linger reads it); the
        connection ends after that, and ``connection_lost`` gives back what it held."""
        if self._conn is None or self._streaming:
            return
        self._streaming = True
        self._feed_reader()

    def _feed_reader(self) -> None:
        if self._buffer:
            self._reader.feed_data(bytes(self._buffer))
            self._buffer.clear()
        if self._eof:
            self._reader.feed_eof()
        if self._paused:
            self._paused = False
            self._pause_reading(False)

    def _to_classic(self) -> None:
        """The rest of the connection runs on the classic path, from the first unconsumed byte."""
        if self._conn is not None:
            self._leave_one_pass()
        self._feed_reader()
        assert self._writer is not None
        task = self._event_loop.create_task(self._proxy._on_client(self._reader, self._writer))
        self._task = task  # StreamReaderProtocol keeps it the same way for its client_connected_cb
