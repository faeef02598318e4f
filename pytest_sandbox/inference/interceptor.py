"""``inference.local`` interception: terminate TLS, route inference requests, deny everything else.

The egress proxy answers ``200 Connection Established`` to ``CONNECT inference.local:443`` and hands
the client connection to :class:`InferenceInterceptor` (network.md §4). The interceptor

1. upgrades the connection to TLS with a leaf for ``inference.local`` minted by the per-session
   :class:`InterceptionCA` (the sandboxed child trusts it through ``SSL_CERT_FILE`` & co.);
2. reads requests one by one from the decrypted stream with the strict framing reader;
3. forwards a request that matches an inference route to the configured backend over *verified*
   TLS, with the sandbox's credentials stripped and the route's own key added, streaming the
   response back as it arrives;
4. answers anything else ``403 {"error":"connection not allowed by policy"}`` and **closes the
   connection**, whatever was routed before on it. Before OpenShell PR #819 the loop kept reading
   after such a 403; ``close_on_denied=False`` reproduces that bug so a suite can prove it detects it.

Every decision is handed to ``record`` as a dict with a ``reason`` code (see :data:`REASONS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11
import trustme

from pytest_sandbox.http.framing import FramingViolation, check_response_head
from pytest_sandbox.http.streams import Request, RequestReader, write_response
from pytest_sandbox.inference.routes import InferenceRoute, baseline_routes, match_route, parse_request_target

INFERENCE_HOST = "inference.local"
INFERENCE_PORT = 443

# The exact refusal OpenShell sends since #819 for a non-inference request (network.md §4).
DENIED_STATUS = 403
DENIED_BODY = b'{"error":"connection not allowed by policy"}'
UPSTREAM_FAILED_STATUS = 502

# The request head is read up to 8 KiB, as OpenShell does (network.md §4; beyond it, 431).
MAX_REQUEST_HEAD = 8192
# OpenShell's intercepted-request buffer grows up to 10 MiB; beyond that, 413.
MAX_REQUEST_BODY = 10 * 1024 * 1024
# OpenShell's router caps a streamed response at 32 MiB with a 30 s idle timeout.
MAX_RESPONSE_BODY = 32 * 1024 * 1024
MAX_RESPONSE_HEAD = 65536
UPSTREAM_IDLE_TIMEOUT_SECONDS = 30.0
UPSTREAM_CONNECT_TIMEOUT_SECONDS = 10.0
TLS_HANDSHAKE_TIMEOUT_SECONDS = 10.0
RESOLVE_TIMEOUT_SECONDS = 10.0
DRAIN_TIMEOUT_SECONDS = 5.0
# Closing: after the last response, FIN first and keep reading (discarding) for a moment, so bytes
# the client already pipelined do not turn the close into a RST that destroys the response
# in flight (RFC 9112 §9.6, "tear-down").
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 256 * 1024

# Reason codes recorded for each decision.
REASONS: dict[str, str] = {
    "routed": "matched an inference route and was forwarded to the backend",
    "inference_denied": "matched no inference route; 403 and (unless weakened) the connection closed",
    "host_mismatch": "inner Host or absolute-form authority is not inference.local[:443]",
    "framing:<case>": "the request framing was ambiguous or malformed (see pytest_sandbox.http.framing)",
    "client_tls_failed": "the client did not complete the TLS handshake with the interception leaf",
    "upstream_resolve_failed": "the backend host did not resolve",
    "upstream_unreachable": "no resolved backend address accepted the connection",
    "upstream_tls_failed": "the backend certificate failed verification; never retried without it",
    "upstream_protocol_error": "the backend sent a malformed or oversized response, or went idle",
    "request_not_forwardable": "the request could not be re-serialised for the backend",
    "client_closed_mid_request": "the client closed the connection in the middle of a request",
}

# RFC 9110 §7.6.1 hop-by-hop fields, plus the proxy-* family (credentials for *this* proxy, never
# for the origin), plus the ones the interceptor always rewrites itself.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
_REWRITTEN_REQUEST_FIELDS = frozenset({"host", "content-length", "authorization", "x-api-key"})
_REWRITTEN_RESPONSE_FIELDS = frozenset({"content-length"})

# The same shapes as pytest_sandbox.network.proxy.server's: ``async resolve(name) -> address literals``, and
# ``factory(family) -> new unconnected stream socket`` (in the lab: created inside its netns).
Resolver = Callable[[str], Awaitable[Sequence[str]]]
SocketFactory = Callable[[int], socket.socket]
# One decision per request, keyed like pytest_sandbox.network.proxy.server.Decision minus ``seq`` and ``client``:
# method, target, host, port, action ("allow" / "deny" / "error"), status, reason, detail, addresses.
Decision = dict[str, Any]
DecisionRecorder = Callable[[Decision], None]


class InterceptionCA:
    """The per-session CA whose leaves the interceptor presents for ``inference.local``.

    A fresh trustme CA per session (like OpenShell's ephemeral "OpenShell Sandbox CA"): nothing the
    sandboxed child trusts outlives the session, and no test needs the system trust store.
    """

    def __init__(self, ca: trustme.CA) -> None:
        self.ca = ca
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    @classmethod
    def create(cls) -> InterceptionCA:
        """A new CA with a fresh key."""
        return cls(trustme.CA(organization_name="pytest-sandbox", organization_unit_name="interception CA"))

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM."""
        return self.ca.cert_pem.bytes()

    def write_bundle(self, directory: Path) -> Path:
        """Write the CA certificate to ``directory`` and return the path (for ``SSL_CERT_FILE`` etc.).

        The bundle holds *only* this CA: the lab has no route to public origins, so trusting the
        system roots as well would only widen what a child could be fooled by.
        """
        path = Path(directory) / "pytest-sandbox-interception-ca.pem"
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def env(self, bundle_path: Path | str) -> dict[str, str]:
        """Environment variables that make common TLS clients trust ``bundle_path``.

        The four variables OpenShell sets for its child (network.md §4): OpenSSL-based clients and
        Python ``ssl``, requests, curl, and Node.js (which *adds* to its built-in roots).
        """
        value = str(bundle_path)
        return {
            "SSL_CERT_FILE": value,
            "REQUESTS_CA_BUNDLE": value,
            "CURL_CA_BUNDLE": value,
            "NODE_EXTRA_CA_CERTS": value,
        }

    def server_context(self, hostname: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a leaf for ``hostname``; one per name, cached."""
        with self._lock:
            context = self._contexts.get(hostname)
            if context is None:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                # OpenShell terminates with ALPN http/1.1; h2 is never offered.
                context.set_alpn_protocols(["http/1.1"])
                self.ca.issue_cert(hostname).configure_cert(context)
                self._contexts[hostname] = context
            return context


@dataclass(frozen=True)
class InferenceBackendConfig:
    """Where routed requests go, and the only certificate authority trusted for getting there."""

    host: str
    port: int
    api_key: str
    server_hostname: str
    ca_pem: bytes
    routes: tuple[InferenceRoute, ...] = field(default_factory=baseline_routes)  # the enforced policy's, normally

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"backend port must be 1-65535, got {self.port}")
        if not self.server_hostname:
            raise ValueError("backend server_hostname must name the certificate to verify")
        if not self.ca_pem.strip():
            raise ValueError("backend ca_pem is empty; the upstream must be verified against a CA")

    def __repr__(self) -> str:
        # The route key is a credential: keep it out of logs and assertion messages.
        return (
            f"InferenceBackendConfig(host={self.host!r}, port={self.port}, api_key='***', "
            f"server_hostname={self.server_hostname!r}, routes={len(self.routes)})"
        )

    @property
    def host_header(self) -> str:
        """The Host the backend expects (RFC 9110 §7.2: the port is omitted when it is the default)."""
        return self.server_hostname if self.port == INFERENCE_PORT else f"{self.server_hostname}:{self.port}"

    def upstream_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts *only* ``ca_pem`` and checks the hostname."""
        # cadata given => create_default_context loads no system roots.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca_pem.decode("ascii"))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        return context


def is_inference_authority(authority: str | bytes | None) -> bool:
    """Whether a Host value or absolute-form authority names ``inference.local`` (port 443 only).

    Host names compare case-insensitively (RFC 3986 §3.2.2); nothing else is normalised: a trailing
    dot, userinfo, another port or an IP literal is a mismatch.
    """
    if authority is None:
        return False
    text = authority.decode("latin-1") if isinstance(authority, bytes) else authority
    # ASCII first: str.lower() folds some non-ASCII letters to ASCII ones (U+212A Kelvin -> "k").
    return text.isascii() and text.lower() in (INFERENCE_HOST, f"{INFERENCE_HOST}:{INFERENCE_PORT}")


def forwardable_request_headers(
    headers: Iterable[tuple[str, str]], *, api_key: str, host_header: str, body_length: int, method: str
) -> list[tuple[str, str]]:
    """The header list sent upstream for a routed request. Pure.

    Dropped: hop-by-hop fields and every field the client's ``Connection`` names (RFC 9110
    §7.6.1), ``proxy-*``, the client's credentials (``authorization``, ``x-api-key``: the sandbox
    never holds the real key), ``host`` and ``content-length`` (re-derived here; the body has
    already been de-chunked by the framing reader). Added: the backend's Host, the route key, a
    fresh Content-Length, and ``connection: close`` (one upstream connection per request, so no
    request can ride another's upstream connection).
    """
    kept = _end_to_end_fields(headers, _REWRITTEN_REQUEST_FIELDS)
    # RFC 9110 §8.6: no Content-Length on a bodiless request whose method defines no body.
    has_content = body_length > 0 or method in ("POST", "PUT", "PATCH")
    framing = [("content-length", str(body_length))] if has_content else []
    return [
        ("host", host_header),
        *kept,
        ("authorization", f"Bearer {api_key}"),
        *framing,
        ("connection", "close"),
    ]


def forwardable_response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The backend's response headers minus hop-by-hop fields and its own framing. Pure."""
    return _end_to_end_fields(headers, _REWRITTEN_RESPONSE_FIELDS)


def _end_to_end_fields(headers: Iterable[tuple[str, str]], rewritten: frozenset[str]) -> list[tuple[str, str]]:
    """Lowercased fields minus hop-by-hop ones, every field ``Connection`` names (RFC 9110 §7.6.1),
    the proxy-* family, and the fields this hop writes itself (``rewritten``)."""
    pairs = [(name.lower(), value) for name, value in headers]
    named_by_connection = {
        token.strip().lower() for name, value in pairs if name == "connection" for token in value.split(",")
    }
    return [
        (name, value)
        for name, value in pairs
        if name not in _HOP_BY_HOP
        and name not in rewritten
        and name not in named_by_connection
        and not name.startswith("proxy-")
    ]


class UpstreamError(Exception):
    """The backend could not be used for this request; ``reason`` is the recorded reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TlsStream:
    """A server-side TLS layer over a client connection, and the TCP transport underneath it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    raw_transport: asyncio.BaseTransport


class _TlsStreamProtocol(asyncio.StreamReaderProtocol):
    """Stream protocol for the TLS layer; passes connection loss down to the plaintext protocol.

    After ``loop.start_tls`` the TCP transport delivers to the TLS layer only, so the protocol the
    proxy's plaintext streams were built on would never learn the connection ended, and a proxy
    awaiting ``wait_closed()`` on its original writer would hang.
    """

    def __init__(self, reader: asyncio.StreamReader, plaintext_protocol: asyncio.BaseProtocol) -> None:
        super().__init__(reader)
        self._plaintext_protocol = plaintext_protocol

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # Passed down as a clean close: TLS-layer errors are the interceptor's to record, and
        # asyncio would otherwise re-raise them from the proxy's wait_closed().
        with contextlib.suppress(Exception):
            self._plaintext_protocol.connection_lost(None)


async def start_tls_server(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    context: ssl.SSLContext,
    *,
    handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT_SECONDS,
) -> TlsStream:
    """Upgrade an accepted plaintext stream to server-side TLS; works on Python 3.10 to 3.13.

    Uses ``loop.start_tls`` (3.7+) for every version rather than ``StreamWriter.start_tls`` (3.11+),
    because the latter decides client or server side from how the stream was created
    (``_client_connected_cb``), which the proxy may not have done through ``start_server``.
    Bytes the client sent before the handshake and that already sit in ``reader``'s buffer are
    not replayed into TLS (a client must wait for the ``200`` before its ClientHello).
    """
    del reader  # the plaintext reader is retired; TLS records arrive through the new protocol
    loop = asyncio.get_running_loop()
    raw_transport = writer.transport
    await writer.drain()
    tls_reader = asyncio.StreamReader(limit=MAX_REQUEST_HEAD * 2, loop=loop)
    protocol = _TlsStreamProtocol(tls_reader, raw_transport.get_protocol())
    tls_transport = await loop.start_tls(
        raw_transport, protocol, context, server_side=True, ssl_handshake_timeout=handshake_timeout
    )
    if tls_transport is None:  # typeshed allows None; it only happens on a closing transport
        raise ConnectionError("transport closed during the TLS handshake")
    protocol.connection_made(tls_transport)
    tls_writer = asyncio.StreamWriter(tls_transport, protocol, tls_reader, loop)
    return TlsStream(reader=tls_reader, writer=tls_writer, raw_transport=raw_transport)


class InferenceInterceptor:
    """The handler for an intercepted ``CONNECT inference.local:443`` connection.

    ``resolver`` resolves the backend host (once per upstream dial; ``inference.local`` itself is
    never resolved), ``socket_factory`` makes the socket the backend is dialled from (the lab makes
    it inside its network namespace), ``record`` receives one decision dict per request.

    Weakened variants, for detection tests only: ``close_on_denied=False`` keeps reading after a
    denied request (the pre-#819 keep-alive bug); ``strict_framing=False`` frames requests with h11
    alone (``RequestReader(strict=False)``), which accepts what network.md §5 says must be refused.
    """

    def __init__(
        self,
        ca: InterceptionCA,
        backend: InferenceBackendConfig,
        *,
        resolver: Resolver,
        socket_factory: SocketFactory,
        record: DecisionRecorder,
        close_on_denied: bool = True,
        strict_framing: bool = True,
    ) -> None:
        self.ca = ca
        self.backend = backend
        self.close_on_denied = close_on_denied
        self.strict_framing = strict_framing
        self._resolver = resolver
        self._socket_factory = socket_factory
        self._record = record
        self._upstream_context = backend.upstream_context()

    async def __call__(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            tls = await start_tls_server(client_reader, client_writer, self.ca.server_context(INFERENCE_HOST))
        except (OSError, asyncio.TimeoutError) as error:  # ssl.SSLError is an OSError
            self._decide("client_tls_failed", "error", 0, detail=f"{type(error).__name__}: {error}")
            client_writer.transport.abort()
            return
        try:
            await self._serve(tls)
        finally:
            await _close(tls)

    async def _serve(self, tls: TlsStream) -> None:
        requests = RequestReader(
            tls.reader, max_head=MAX_REQUEST_HEAD, max_body=MAX_REQUEST_BODY, strict=self.strict_framing
        )
        while True:
            try:
                request = await requests.next_request()
            except FramingViolation as violation:
                # RFC 9112 §6.1/§11.2: after a framing error the stream cannot be trusted; answer
                # and close, never parse another byte of it.
                self._decide(f"framing:{violation.case}", "deny", violation.status, detail=violation.detail)
                await _send_refusal(
                    tls.writer, violation.status, {"error": "bad_request", "detail": violation.detail}
                )
                return
            except asyncio.IncompleteReadError:
                self._decide("client_closed_mid_request", "error", 0, detail="EOF inside a request")
                return
            except OSError:  # reset, or a TLS error after the handshake
                return
            if request is None:
                return
            if not await self._handle(request, tls.writer):
                return

    async def _handle(self, request: Request, client: asyncio.StreamWriter) -> bool:
        """Answer one request; return whether the connection may carry another."""
        host = request.header("host")
        facts: dict[str, Any] = {"method": request.method, "target": request.target, "host": host}
        parsed = parse_request_target(request.target)
        absolute_authority = parsed.authority if parsed is not None else None
        if not is_inference_authority(host) or (
            absolute_authority is not None and not is_inference_authority(absolute_authority)
        ):
            self._decide("host_mismatch", "deny", DENIED_STATUS, detail=REASONS["host_mismatch"], **facts)
            await _send_denial(client)
            return False
        route = match_route(self.backend.routes, request.method, request.target)
        if route is None or parsed is None:
            facts["detail"] = "no inference route matches"
            self._decide("inference_denied", "deny", DENIED_STATUS, **facts)
            await _send_denial(client)
            return not self.close_on_denied
        facts["detail"] = f"route {route}"
        try:
            upstream_request = h11.Request(
                method=request.method,
                target=parsed.origin_form,
                headers=forwardable_request_headers(
                    request.headers,
                    api_key=self.backend.api_key,
                    host_header=self.backend.host_header,
                    body_length=len(request.body),
                    method=request.method,
                ),
            )
        except h11.LocalProtocolError as error:
            facts["detail"] += f": {error}"
            self._decide("request_not_forwardable", "error", UPSTREAM_FAILED_STATUS, **facts)
            await _send_refusal(client, UPSTREAM_FAILED_STATUS, {"error": "request_not_forwardable"})
            return False
        try:
            address, upstream_reader, upstream_writer = await self._dial_upstream()
        except UpstreamError as error:
            facts["detail"] += f": {error.detail}"
            self._decide(error.reason, "error", UPSTREAM_FAILED_STATUS, **facts)
            await _send_refusal(client, UPSTREAM_FAILED_STATUS, {"error": error.reason})
            return False
        facts["addresses"] = (address,)
        try:
            return await self._exchange(
                upstream_request, request, upstream_reader, upstream_writer, client, facts
            )
        finally:
            upstream_writer.transport.abort()

    async def _exchange(
        self,
        upstream_request: h11.Request,
        request: Request,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        facts: dict[str, Any],
    ) -> bool:
        connection = h11.Connection(h11.CLIENT)
        try:
            upstream_writer.write(connection.send(upstream_request) or b"")
            if request.body:
                upstream_writer.write(connection.send(h11.Data(data=request.body)) or b"")
            upstream_writer.write(connection.send(h11.EndOfMessage()) or b"")
            await _drain(upstream_writer)
            response = await _read_response_head(connection, upstream_reader)
        except (h11.ProtocolError, FramingViolation, OSError, asyncio.TimeoutError, EOFError) as error:
            facts["detail"] += f": {type(error).__name__}: {error}"
            self._decide("upstream_protocol_error", "error", UPSTREAM_FAILED_STATUS, **facts)
            await _send_refusal(client, UPSTREAM_FAILED_STATUS, {"error": "upstream_protocol_error"})
            return False
        self._decide("routed", "allow", response.status_code, **facts)
        # HTTP/1.0 clients cannot take chunked coding (RFC 9112 §7.1): their body is close-delimited.
        chunked_to_client = request.http_version == "1.1"
        keep_open = request.keep_alive
        has_body = not (100 <= response.status_code < 200 or response.status_code in (204, 304))
        headers = forwardable_response_headers(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers
        )
        if has_body and chunked_to_client:
            headers.append(("transfer-encoding", "chunked"))
        elif has_body:
            keep_open = False
        if not keep_open:
            headers.append(("connection", "close"))
        client.write(_response_head(response.status_code, response.reason, headers))
        await _drain(client)
        if not has_body:
            return keep_open
        try:
            await _relay_body(connection, upstream_reader, client, chunked=chunked_to_client)
        except (h11.ProtocolError, OSError, asyncio.TimeoutError, EOFError) as error:
            # The head is already out: cutting the connection is the only honest signal left.
            facts["detail"] += f": mid-response {type(error).__name__}: {error}"
            self._decide("upstream_protocol_error", "error", response.status_code, **facts)
            return False
        return keep_open

    async def _dial_upstream(self) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
        """Resolve the backend once, connect to a resolved address, verify its TLS certificate."""
        addresses = await self._resolve(self.backend.host)
        loop = asyncio.get_running_loop()
        failures: list[str] = []
        for address in addresses:
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sockaddr = (str(address), self.backend.port)
            sock = self._socket_factory(family)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, sockaddr), UPSTREAM_CONNECT_TIMEOUT_SECONDS)
            except (OSError, asyncio.TimeoutError) as error:
                sock.close()
                failures.append(f"{address}: {type(error).__name__}: {error}")
                continue
            try:
                reader, writer = await asyncio.open_connection(
                    sock=sock,
                    ssl=self._upstream_context,
                    server_hostname=self.backend.server_hostname,
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_SECONDS,
                )
            except (OSError, asyncio.TimeoutError) as error:
                # A failed verification is final: no other address, no retry without verification.
                sock.close()
                detail = f"{address}: {type(error).__name__}: {error}"
                raise UpstreamError("upstream_tls_failed", detail) from None
            return str(address), reader, writer
        raise UpstreamError("upstream_unreachable", "; ".join(failures) or "no addresses")

    async def _resolve(self, host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        try:
            return [ipaddress.ip_address(host)]  # an IP literal is not resolved
        except ValueError:
            pass
        try:
            answers = await asyncio.wait_for(self._resolver(host), RESOLVE_TIMEOUT_SECONDS)
            addresses = [ipaddress.ip_address(answer) for answer in answers]
        except Exception as error:  # any resolver failure is a refusal, never a crash
            detail = f"{host}: {type(error).__name__}: {error}"
            raise UpstreamError("upstream_resolve_failed", detail) from None
        if not addresses:
            raise UpstreamError("upstream_resolve_failed", f"{host}: no addresses")
        return addresses

    def _decide(self, reason: str, action: str, status: int, **facts: Any) -> None:
        decision: Decision = {
            "method": "",
            "target": "",
            "host": None,
            "port": None,
            "action": action,
            "status": status,
            "reason": reason,
            "detail": "",
            "addresses": (),
        }
        decision.update(facts)
        self._record(decision)


async def _read_response_head(connection: h11.Connection, reader: asyncio.StreamReader) -> h11.Response:
    """Read the backend's response head, judged by the strict framing checks before h11 sees it.

    h11 0.16 accepts a response with both Content-Length and Transfer-Encoding (TE wins);
    network.md §5 requires bad response framing to end in 502, so every head (1xx included) goes
    through ``check_response_head`` first.
    """
    buffer = b""
    offset = 0
    while True:
        end = buffer.find(b"\r\n\r\n", offset)
        if end == -1:
            if len(buffer) - offset > MAX_RESPONSE_HEAD:
                raise EOFError(f"response head larger than {MAX_RESPONSE_HEAD} bytes")
            data = await asyncio.wait_for(reader.read(65536), UPSTREAM_IDLE_TIMEOUT_SECONDS)
            if not data:
                raise EOFError("backend closed before a complete response head")
            buffer += data
            continue
        head = check_response_head(buffer[offset : end + 4], max_head=MAX_RESPONSE_HEAD)
        offset = end + 4
        if head.status >= 200:
            break
    connection.receive_data(buffer)
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Response):
            return event
        if not isinstance(event, h11.InformationalResponse):  # 100 Continue & co. are skipped
            raise EOFError(f"unexpected upstream event {type(event).__name__}")


async def _relay_body(
    connection: h11.Connection,
    upstream_reader: asyncio.StreamReader,
    client: asyncio.StreamWriter,
    *,
    chunked: bool,
) -> None:
    """Pass the response body on as it arrives, re-framed as chunked (or raw for HTTP/1.0)."""
    relayed = 0
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await asyncio.wait_for(upstream_reader.read(65536), UPSTREAM_IDLE_TIMEOUT_SECONDS)
            connection.receive_data(data)
        elif isinstance(event, h11.Data):
            relayed += len(event.data)
            if relayed > MAX_RESPONSE_BODY:
                raise EOFError(f"response larger than {MAX_RESPONSE_BODY} bytes")
            if event.data:
                # Written at once: an SSE token must not wait for the rest of the stream.
                client.write(b"%x\r\n%b\r\n" % (len(event.data), event.data) if chunked else event.data)
                await _drain(client)
        elif isinstance(event, h11.EndOfMessage):
            if chunked:
                client.write(b"0\r\n\r\n")  # upstream trailers are dropped, never merged
                await _drain(client)
            return
        else:
            raise EOFError(f"unexpected upstream event {type(event).__name__}")


def _response_head(status: int, reason: bytes, headers: Iterable[tuple[str, str]]) -> bytes:
    # Values come from a head check_response_head and h11 both accepted: no CR, LF or NUL in them.
    lines = [b"HTTP/1.1 %d %b" % (status, reason)]
    lines.extend(f"{name}: {value}".encode("latin-1") for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _send_denial(writer: asyncio.StreamWriter) -> None:
    # Exactly #819's answer; #819 sends no "Connection: close": the close itself is the signal.
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await write_response(
            writer, DENIED_STATUS, "Forbidden", [("content-type", "application/json")], DENIED_BODY
        )


async def _send_refusal(writer: asyncio.StreamWriter, status: int, payload: dict[str, str]) -> None:
    """A JSON refusal announcing the close that follows (the caller closes)."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [("content-type", "application/json"), ("connection", "close")]
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await write_response(writer, status, _reason_phrase(status), headers, body)


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def _drain(writer: asyncio.StreamWriter) -> None:
    await asyncio.wait_for(writer.drain(), DRAIN_TIMEOUT_SECONDS)


async def _close(tls: TlsStream) -> None:
    """Close like #819 -- the TLS stream is dropped without close_notify -- but FIN first and linger.

    ``StreamWriter.close()`` on a TLS stream would send close_notify and then wait up to
    ``ssl_shutdown_timeout`` (30 s) for the client's, holding the TCP connection open meanwhile.
    Instead the TCP transport is taken away from the TLS layer (so a late close_notify or record
    from the client is never processed or answered), half-closed, and whatever the client still
    sends is discarded until it closes or ``LINGER_SECONDS`` pass (RFC 9112 §9.6: closing with
    unread bytes would send a RST that can destroy the response still in flight).
    """
    raw = tls.raw_transport
    with contextlib.suppress(OSError, asyncio.TimeoutError, RuntimeError):
        await _drain(tls.writer)  # the TLS layer has handed every record to ``raw`` by now
    if raw.is_closing() or not isinstance(raw, asyncio.Transport):
        raw.close()
        return
    # Pausing the TLS layer's reading first stops it from processing records it already holds (a
    # close_notify among them would make it write an answer after our FIN, which asyncio refuses).
    with contextlib.suppress(OSError, RuntimeError):
        tls.writer.transport.pause_reading()  # type: ignore[attr-defined]
    lingering = _DiscardUntilClosed(raw.get_protocol(), LINGER_MAX_BYTES)
    raw.set_protocol(lingering)
    with contextlib.suppress(OSError, RuntimeError):
        raw.resume_reading()  # the TLS layer may have paused it for flow control
        if raw.can_write_eof():
            raw.write_eof()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(lingering.closed), LINGER_SECONDS)
    raw.close()


class _DiscardUntilClosed(asyncio.Protocol):
    """Takes over a TCP transport for the linger: drops bytes, notices the close, passes it on."""

    def __init__(self, tls_protocol: asyncio.BaseProtocol, max_bytes: int) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tls_protocol = tls_protocol
        self._max_bytes = max_bytes
        self._discarded = 0

    def data_received(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > self._max_bytes and not self.closed.done():
            self.closed.set_result(None)  # enough: stop lingering

    def eof_received(self) -> bool:
        return False  # the client closed its side: let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        # The TLS layer (and through it the proxy's plaintext protocol) must still learn of it.
        with contextlib.suppress(Exception):
            self._tls_protocol.connection_lost(None)


