"""The reference egress proxy: CONNECT and absolute-form HTTP/1.1, SSRF-safe, every request judged.

The rule (network.md §3): canonicalise the authority (anything odd is 400) -> check the host and
port policy -> resolve **once** with the injected resolver (IP literals are not resolved) ->
classify **every** answer -> deny if any answer is special -> dial **exactly** a checked address
with a socket from the injected factory (no hostname ever reaches a function that could resolve it
again) -> repeat for every request on a keep-alive connection and every new upstream connection.

Requests are framed strictly (:mod:`pytest_sandbox.framing`); a framing violation is answered and
the connection closed without parsing another byte (network.md §5). Every request and CONNECT gets
one :class:`Decision` with a reason code.

Two switches weaken the proxy on purpose, so a conformance suite can prove it detects the holes
they open: ``strict_framing=False`` (h11 0.16 framing only) and ``judge_every_request=False``
(only the first request of a connection is judged; later ones ride its upstream connection, as
OpenShell's absolute-form path did at PR #819).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import ipaddress
import itertools
import json
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_sandbox.addresses import (
    AddressVerdict,
    Authority,
    MalformedTarget,
    classify_address,
    parse_absolute_form,
    parse_authority,
)
from pytest_sandbox.framing import FramingViolation
from pytest_sandbox.http_stream import (
    DEFAULT_MAX_BODY,
    Request,
    RequestReader,
    Response,
    ResponseReader,
    response_bytes,
    write_response,
)

__all__ = [
    "Decision",
    "EgressProxy",
    "InterceptHandler",
    "ProxyConfig",
    "Resolver",
    "SocketFactory",
]

Resolver = Callable[[str], Awaitable[list[str]]]
SocketFactory = Callable[[int], socket.socket]
InterceptHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ConnectInterceptor = Callable[[str, int], "InterceptHandler | None"]


@dataclass(frozen=True)
class ProxyConfig:
    allowed_hosts: tuple[str, ...] = ("*",)  # fnmatch patterns on the canonical (lowercase) host
    allowed_ports: tuple[int, ...] = (80, 443)
    classify: Callable[[str], AddressVerdict] = classify_address  # injection point for weakened proxies
    strict_framing: bool = True  # False = weakened (h11 only)
    judge_every_request: bool = True  # False = weakened (first request only)
    max_head: int = 8192  # OpenShell answers 431 beyond 8 KiB (network.md §4)
    max_body: int = DEFAULT_MAX_BODY
    max_response_body: int = 32 * 2**20
    idle_timeout: float = 60.0  # seconds a client connection may sit between requests
    connect_timeout: float = 10.0
    upstream_timeout: float = 60.0  # seconds to wait for a complete upstream response
    resolve_timeout: float = 5.0


@dataclass(frozen=True)
class Decision:
    """One judged request or CONNECT. ``reason`` is a stable code a human can act on."""

    seq: int
    client: str
    method: str
    target: str
    host: str | None
    port: int | None
    action: str  # "allow" | "deny" | "error" | "intercept"
    status: int
    reason: str  # routed, intercepted, unjudged, ssrf_denied, policy_denied, malformed_target,
    # https_absolute_form, header_too_large, upstream_unreachable, upstream_protocol_error,
    # resolution_failed, framing:<case>
    detail: str
    addresses: tuple[str, ...]


# RFC 9110 §7.6.1 hop-by-hop fields, plus what this proxy re-creates itself (Host from the target,
# RFC 9112 §3.2.2; Content-Length from the decoded body) and Expect (the body is already read).
_REQUEST_FIELDS_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
_RESPONSE_FIELDS_NOT_FORWARDED = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
     "content-length"}
)
# RFC 9110 §9.2.2: safe to retry once on a stale keep-alive upstream connection.
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

_RELAY_CHUNK = 256 * 1024
_STREAM_LIMIT = 1024 * 1024
_LINGER_SECONDS = 2.0
_LINGER_MAX_BYTES = 1 << 20
_CLASSIFY_CACHE_SIZE = 4096


class _Refusal(Exception):
    """A request the proxy answers itself, with a JSON body and a closed connection."""

    def __init__(
        self, status: int, reason: str, detail: str, *, addresses: tuple[str, ...] = (),
        action: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.addresses = addresses
        self.action = action or ("error" if status >= 500 and status != 501 else "deny")


def _framing_refusal(violation: FramingViolation) -> _Refusal:
    reason = "header_too_large" if violation.case == "head-too-large" else f"framing:{violation.case}"
    return _Refusal(violation.status, reason, violation.detail)


def _target_refusal(error: MalformedTarget) -> _Refusal:
    reason = "https_absolute_form" if error.reason == "https_absolute_form" else "malformed_target"
    return _Refusal(400, reason, f"{error} ({error.reason})")


def _host_header(authority: Authority, default_port: int) -> str:
    host = f"[{authority.host}]" if ":" in authority.host else authority.host
    return host if authority.port == default_port else f"{host}:{authority.port}"


def _connection_options(headers: tuple[tuple[str, str], ...]) -> set[str]:
    return {
        token.strip().lower()
        for name, value in headers
        if name == "connection"
        for token in value.split(",")
    }


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


@dataclass
class _Upstream:
    key: tuple[str, int]  # the checked (address, port) this connection was dialled to
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    responses: ResponseReader = field(init=False)

    def __post_init__(self) -> None:
        self.responses = ResponseReader(self.reader)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


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
    ) -> None:
        self.config = config
        self._resolver = resolver
        self._socket_factory = socket_factory
        self._connect_interceptor = connect_interceptor
        self._lock = threading.Lock()
        self._decisions: list[Decision] = []
        self._seq = itertools.count(1)
        self._listening: set[tuple[str, int]] = set()
        self._classified: dict[str, AddressVerdict] = {}
        self._host_allowed: dict[str, bool] = {}
        self._allowed_ports = frozenset(config.allowed_ports)
        self._host_patterns = tuple(pattern.lower() for pattern in config.allowed_hosts)
        self._client_tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Future[None] | None = None

    # --- public surface -----------------------------------------------------------------------

    @property
    def decisions(self) -> list[Decision]:
        """A copy of every decision so far, in order (safe to call from any thread)."""
        with self._lock:
            return list(self._decisions)

    def self_addresses(self) -> set[tuple[str, int]]:
        """The (address, port) pairs this proxy listens on; dialling one is a self-connection."""
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
                asyncio.run(run())

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
            if ipaddress.ip_address(host.split("%")[0]).is_unspecified:
                # A wildcard listener is reachable through loopback too.
                self._listening.update({("127.0.0.1", port), ("::1", port)})
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
        finally:
            self._client_tasks.discard(task)
            writer.close()

    # --- decisions ----------------------------------------------------------------------------

    def _record(
        self, client: str, request: Request | None, *, authority: Authority | None, action: str,
        status: int, reason: str, detail: str, addresses: tuple[str, ...] = (),
    ) -> None:
        with self._lock:
            self._decisions.append(
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
        self, client: str, request: Request | None, authority: Authority | None, refusal: _Refusal,
        addresses: tuple[str, ...] = (),
    ) -> None:
        self._record(client, request, authority=authority, action=refusal.action, status=refusal.status,
                     reason=refusal.reason, detail=refusal.detail, addresses=refusal.addresses or addresses)

    # --- one client connection ----------------------------------------------------------------

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        requests = RequestReader(
            reader, max_head=self.config.max_head, max_body=self.config.max_body,
            strict=self.config.strict_framing,
        )
        upstreams: dict[tuple[str, int], _Upstream] = {}
        first_upstream: list[_Upstream] = []  # weakened mode: the connection later requests ride
        try:
            while True:
                try:
                    request = await asyncio.wait_for(requests.next_request(), self.config.idle_timeout)
                except FramingViolation as violation:
                    refusal = _framing_refusal(violation)
                    self._record_refusal(client, None, None, refusal)
                    await self._refuse(reader, writer, refusal)
                    return
                if request is None:
                    return
                if request.method == "CONNECT":
                    await self._handle_connect(client, request, requests, reader, writer)
                    return
                if not await self._handle_forward(client, request, upstreams, first_upstream, reader, writer):
                    return
        finally:
            for upstream in upstreams.values():
                upstream.close()

    async def _refuse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, refusal: _Refusal
    ) -> None:
        """Answer with ``{"error": reason, "detail": ...}``, ``Connection: close``, and close.

        The connection is half-closed after the answer and the rest of the client's input is read
        and discarded, never parsed (RFC 9931: a refused CONNECT's trailing bytes are not a
        request). Discarding avoids a TCP reset that could destroy the answer in flight
        (RFC 9112 §9.6).
        """
        body = json.dumps({"error": refusal.reason, "detail": refusal.detail}, separators=(",", ":")).encode()
        reason_phrase = {400: "Bad Request", 403: "Forbidden", 413: "Content Too Large",
                         431: "Request Header Fields Too Large", 501: "Not Implemented",
                         502: "Bad Gateway", 505: "HTTP Version Not Supported"}.get(refusal.status, "Error")
        with contextlib.suppress(ConnectionError):
            await write_response(
                writer, refusal.status, reason_phrase,
                [("content-type", "application/json"), ("connection", "close")], body,
            )
        await self._linger_close(reader, writer)

    async def _linger_close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
        discarded = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _LINGER_SECONDS
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            while discarded < _LINGER_MAX_BYTES and loop.time() < deadline:
                data = await asyncio.wait_for(reader.read(65536), deadline - loop.time())
                if not data:
                    break
                discarded += len(data)
        writer.close()

    # --- absolute-form requests ---------------------------------------------------------------

    async def _handle_forward(
        self, client: str, request: Request, upstreams: dict[tuple[str, int], _Upstream],
        first_upstream: list[_Upstream], reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ) -> bool:
        """Judge and forward one request; True when the client connection may carry another."""
        if first_upstream and not self.config.judge_every_request:
            return await self._forward_unjudged(client, request, first_upstream[0], reader, writer)
        authority: Authority | None = None
        addresses: tuple[str, ...] = ()
        try:
            try:
                _, authority, path = parse_absolute_form(request.target)
            except MalformedTarget as error:
                raise _target_refusal(error) from None
            self._check_policy(authority)
            addresses = await self._checked_addresses(authority)
            upstream, response = await self._exchange(request, authority, path, addresses, upstreams)
        except _Refusal as refusal:
            self._record_refusal(client, request, authority, refusal, addresses)
            await self._refuse(reader, writer, refusal)
            return False
        if not first_upstream:
            first_upstream.append(upstream)
        self._record(client, request, authority=authority, action="allow", status=response.status,
                     reason="routed", detail=f"forwarded to {upstream.key[0]} port {upstream.key[1]}",
                     addresses=addresses)
        return await self._answer(request, response, reader, writer)

    async def _forward_unjudged(
        self, client: str, request: Request, upstream: _Upstream,
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ) -> bool:
        """Weakened mode: the request rides the first request's upstream, unjudged (the hole)."""
        path = request.target
        with contextlib.suppress(MalformedTarget):
            path = parse_absolute_form(request.target)[2]
        upstream.writer.write(self._upstream_request(request, request.header("host") or "", path))
        try:
            response = await upstream.responses.next_response(request.method)
        except (FramingViolation, OSError, asyncio.IncompleteReadError) as error:
            refusal = _Refusal(502, "upstream_protocol_error", str(error))
            await self._refuse(reader, writer, refusal)
            return False
        self._record(client, request, authority=None, action="allow", status=response.status,
                     reason="unjudged", detail="judge_every_request=False: rode the first upstream",
                     addresses=(upstream.key[0],))
        return await self._answer(request, response, reader, writer)

    def _check_policy(self, authority: Authority) -> None:
        if authority.port not in self._allowed_ports:
            raise _Refusal(403, "policy_denied",
                           f"port {authority.port} of {authority.host} not permitted by policy")
        allowed = self._host_allowed.get(authority.host)
        if allowed is None:
            allowed = any(fnmatch.fnmatchcase(authority.host, pattern) for pattern in self._host_patterns)
            if len(self._host_allowed) < _CLASSIFY_CACHE_SIZE:
                self._host_allowed[authority.host] = allowed
        if not allowed:
            raise _Refusal(403, "policy_denied", f"host {authority.host} not permitted by policy")

    def _classify(self, address: str) -> AddressVerdict:
        verdict = self._classified.get(address)
        if verdict is None:
            verdict = self.config.classify(address)
            if len(self._classified) < _CLASSIFY_CACHE_SIZE:
                self._classified[address] = verdict
        return verdict

    async def _checked_addresses(self, authority: Authority) -> tuple[str, ...]:
        """Resolve once (never for an IP literal), classify every answer, deny if any is special."""
        where = f"{authority.host}:{authority.port}"
        if authority.ip is not None:
            answers: list[str] = [str(authority.ip)]
        else:
            try:
                answers = list(await asyncio.wait_for(self._resolver(authority.host),
                                                      self.config.resolve_timeout))
            except Exception as error:
                raise _Refusal(502, "resolution_failed",
                               f"{where}: resolving failed: {type(error).__name__}: {error}") from None
            if not answers:
                raise _Refusal(502, "resolution_failed", f"{where}: the resolver returned no address")
        checked: list[str] = []
        for answer in answers:
            try:
                verdict = self._classify(answer)
            except ValueError:
                raise _Refusal(403, "ssrf_denied", f"{where} blocked: resolver answer {answer!r} is not an "
                               "address literal", addresses=tuple(answers)) from None
            if verdict.denied:
                raise _Refusal(403, "ssrf_denied", f"{where} blocked: {answer} is {verdict.reason}",
                               addresses=tuple(answers))
            if (verdict.address, authority.port) in self._listening:
                raise _Refusal(403, "ssrf_denied", f"{where} blocked: {answer} port {authority.port} is this "
                               "proxy (self connection)", addresses=tuple(answers))
            checked.append(verdict.address)
        return tuple(checked)

    async def _dial(self, addresses: tuple[str, ...], port: int) -> _Upstream:
        """Connect to the first reachable checked address, with a socket from the factory."""
        failures: list[str] = []
        for address in addresses:
            ip = ipaddress.ip_address(address)
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            sockaddr: tuple[Any, ...] = (address, port, 0, 0) if ip.version == 6 else (address, port)
            sock = self._socket_factory(family)
            try:
                await asyncio.wait_for(_connect_socket(sock, sockaddr), self.config.connect_timeout)
                reader, writer = await asyncio.open_connection(sock=sock, limit=_STREAM_LIMIT)
            except (OSError, TimeoutError) as error:
                sock.close()
                failures.append(f"{address}: {error or type(error).__name__}")
                continue
            return _Upstream((address, port), reader, writer)
        raise _Refusal(502, "upstream_unreachable", f"port {port}: " + "; ".join(failures),
                       addresses=addresses)

    def _upstream_request(self, request: Request, host: str, path: str) -> bytes:
        listed = _connection_options(request.headers)
        parts = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (request.method.encode(), path.encode("latin-1"),
                                                       host.encode("latin-1"))]
        for name, value in request.headers:
            if name in _REQUEST_FIELDS_NOT_FORWARDED or name in listed or name.startswith("proxy-"):
                continue
            parts.append(b"%s: %s\r\n" % (name.encode("ascii"), value.encode("latin-1")))
        if request.body or request.header("content-length") is not None or request.method in ("POST", "PUT"):
            parts.append(b"content-length: %d\r\n" % len(request.body))
        parts.append(b"\r\n")
        parts.append(request.body)
        return b"".join(parts)

    async def _exchange(
        self, request: Request, authority: Authority, path: str, addresses: tuple[str, ...],
        upstreams: dict[tuple[str, int], _Upstream],
    ) -> tuple[_Upstream, Response]:
        """Send the request to an upstream for one of ``addresses`` and read its response."""
        data = self._upstream_request(request, _host_header(authority, 80), path)
        for attempt in range(2):
            upstream = next((upstreams.pop((a, authority.port)) for a in addresses
                             if (a, authority.port) in upstreams), None)
            reused = upstream is not None
            if upstream is None:
                upstream = await self._dial(addresses, authority.port)
            try:
                upstream.writer.write(data)
                response = await asyncio.wait_for(upstream.responses.next_response(request.method),
                                                  self.config.upstream_timeout)
            except FramingViolation as violation:
                upstream.close()
                raise _Refusal(502, "upstream_protocol_error",
                               f"upstream {upstream.key[0]} sent bad framing: {violation}") from None
            except (TimeoutError, asyncio.TimeoutError):
                upstream.close()
                raise _Refusal(504, "upstream_timeout",
                               f"no complete response from {upstream.key[0]}") from None
            except (OSError, asyncio.IncompleteReadError) as error:
                upstream.close()
                if reused and attempt == 0 and request.method in _IDEMPOTENT_METHODS:
                    continue  # a stale keep-alive connection: dial afresh once
                failure = f"{type(error).__name__}: {error}"
                raise _Refusal(502, "upstream_unreachable",
                               f"upstream {upstream.key[0]} failed: {failure}") from None
            if response.keep_alive:
                upstreams[upstream.key] = upstream
            else:
                upstream.close()
            return upstream, response
        raise AssertionError("unreachable")

    async def _answer(
        self, request: Request, response: Response, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        keep_alive = request.keep_alive
        listed = _connection_options(response.headers)
        headers = [
            (name, value) for name, value in response.headers
            if name not in _RESPONSE_FIELDS_NOT_FORWARDED and name not in listed
        ]
        bodiless = request.method == "HEAD" or response.status in (204, 304)
        if bodiless:
            # RFC 9110 §8.6: a HEAD/304 response's Content-Length describes the body it omits.
            length = response.header("content-length")
            if length is not None:
                headers.append(("content-length", length))
        else:
            headers.append(("content-length", str(len(response.body))))
        if not keep_alive:
            headers.append(("connection", "close"))
        with contextlib.suppress(ConnectionError):
            writer.write(response_bytes(response.status, response.reason, headers, response.body))
            await writer.drain()
        if not keep_alive:
            await self._linger_close(reader, writer)
        return keep_alive

    # --- CONNECT --------------------------------------------------------------------------------

    async def _handle_connect(
        self, client: str, request: Request, requests: RequestReader,
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ) -> None:
        authority: Authority | None = None
        addresses: tuple[str, ...] = ()
        try:
            try:
                authority = parse_authority(request.target)
            except MalformedTarget as error:
                raise _target_refusal(error) from None
            handler = self._connect_interceptor(authority.host, authority.port) \
                if self._connect_interceptor is not None else None
            if handler is not None:
                if requests.leftover():
                    # The interceptor speaks TLS from its first byte; bytes sent before our 200
                    # (RFC 9931 optimistic data) could never be replayed into that handshake.
                    raise _Refusal(400, "framing:connect-early-data",
                                   "bytes sent before 200 Connection Established on an intercepted CONNECT")
                self._record(client, request, authority=authority, action="intercept", status=200,
                             reason="intercepted", detail="handed to the connect interceptor")
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                await writer.drain()
                await handler(reader, writer)
                return
            self._check_policy(authority)
            addresses = await self._checked_addresses(authority)
            upstream = await self._dial(addresses, authority.port)
        except _Refusal as refusal:
            self._record_refusal(client, request, authority, refusal, addresses)
            await self._refuse(reader, writer, refusal)
            return
        self._record(client, request, authority=authority, action="allow", status=200, reason="routed",
                     detail=f"tunnel to {upstream.key[0]} port {upstream.key[1]}", addresses=addresses)
        try:
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            early = requests.leftover()
            if early:
                upstream.writer.write(early)  # tunnel payload, never parsed as HTTP
            await _relay(reader, writer, upstream.reader, upstream.writer)
        finally:
            upstream.close()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy bytes until EOF, then half-close the sink; no per-chunk policy work on this path."""
    transport = sink.transport
    read = source.read
    write = transport.write
    while True:
        data = await read(_RELAY_CHUNK)
        if not data:
            break
        write(data)
        if transport.get_write_buffer_size() > _RELAY_CHUNK:
            await sink.drain()
    with contextlib.suppress(OSError, RuntimeError):
        if sink.can_write_eof():
            sink.write_eof()


async def _relay(
    client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter,
) -> None:
    outbound = asyncio.ensure_future(_pump(client_reader, upstream_writer))
    inbound = asyncio.ensure_future(_pump(upstream_reader, client_writer))
    try:
        done, pending = await asyncio.wait({outbound, inbound}, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                for other in pending:
                    other.cancel()
    finally:
        for task in (outbound, inbound):
            task.cancel()
        await asyncio.gather(outbound, inbound, return_exceptions=True)
