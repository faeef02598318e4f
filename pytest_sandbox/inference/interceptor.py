"""``inference.local`` interception: the routed requests' trip to the backend, and the answers back.

The egress proxy answers ``200 Connection Established`` to ``CONNECT inference.local:443`` and hands
the client connection to :class:`InferenceInterceptor` (network.md §4). The interceptor upgrades it to
TLS with a leaf from the per-session :class:`~pytest_sandbox.inference.ca.InterceptionCA`
(``inference/tls.py``), reads requests one by one with the strict framing reader, and asks the pure
:func:`~pytest_sandbox.inference.routing.route_request` about each: a routed request goes to the
configured backend over *verified* TLS with the route's own key, its response streamed back as it
arrives; anything else gets ``403 {"error":"connection not allowed by policy"}`` and the connection
**closes** (``close_on_denied=False`` reproduces the pre-#819 bug so a suite can prove it detects it).

Every decision is handed to ``record`` as a dict with a ``reason`` code (see ``routing.REASONS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11

from pytest_sandbox.http.framing import HEAD_END, READ_SIZE, FramingViolation, check_response_head
from pytest_sandbox.http.streams import Request, RequestReader, write_response
from pytest_sandbox.inference.ca import InterceptionCA
from pytest_sandbox.inference.routes import InferenceRoute
from pytest_sandbox.inference.routing import (
    DENIED_BODY,
    DENIED_STATUS,
    INFERENCE_HOST,
    INFERENCE_PORT,
    UPSTREAM_FAILED_STATUS,
    Deny,
    forwardable_response_headers,
    route_request,
)
from pytest_sandbox.inference.tls import TLS_HANDSHAKE_TIMEOUT_SECONDS, TlsStream, close_tls, drain, start_tls_server
from pytest_sandbox.network.proxy.watchdog import bounded
from pytest_sandbox.policy.load import baseline_routes

__all__ = [
    "DecisionRecorder",
    "InferenceBackendConfig",
    "InferenceInterceptor",
    "UpstreamError",
]

# The request head is read up to 8 KiB, as OpenShell does (network.md §4; beyond it, 431).
MAX_REQUEST_HEAD = 8192
# OpenShell's intercepted-request buffer grows up to 10 MiB; beyond that, 413.
MAX_REQUEST_BODY = 10 * 1024 * 1024
# OpenShell's router caps a streamed response at 32 MiB with a 30 s idle timeout.
MAX_RESPONSE_BODY = 32 * 1024 * 1024
MAX_RESPONSE_HEAD = 65536
UPSTREAM_IDLE_TIMEOUT_SECONDS = 30.0
UPSTREAM_CONNECT_TIMEOUT_SECONDS = 10.0
RESOLVE_TIMEOUT_SECONDS = 10.0
# After the TLS handshake, the same deadline as the egress proxy's ``idle_timeout``: a client has this
# long to deliver each complete request (waiting, head and body), so an idle or 1-byte-per-second
# client cannot hold an intercepted connection (slowloris).
CLIENT_IDLE_TIMEOUT_SECONDS = 60.0

# The same shapes as pytest_sandbox.network.proxy.server's: ``async resolve(name) -> address literals``, and
# ``factory(family) -> new unconnected stream socket`` (in the lab: created inside its netns).
Resolver = Callable[[str], Awaitable[Sequence[str]]]
SocketFactory = Callable[[int], socket.socket]
# One decision per request, keyed like pytest_sandbox.network.proxy.config.Decision minus ``seq`` and ``client``:
# method, target, host, port, action ("allow" / "deny" / "error"), status, reason, detail, addresses.
Decision = dict[str, Any]
DecisionRecorder = Callable[[Decision], None]


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


class UpstreamError(Exception):
    """The backend could not be used for this request; ``reason`` is the recorded reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _ClientGone(Exception):
    """The client stopped taking the response (hung up, reset, or stalled past the drain deadline)."""


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
        idle_timeout: float = CLIENT_IDLE_TIMEOUT_SECONDS,
    ) -> None:
        self.ca = ca
        self.idle_timeout = idle_timeout
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
            tls = await start_tls_server(client_reader, client_writer, self.ca.server_context(INFERENCE_HOST),
                                         limit=MAX_REQUEST_HEAD * 2)
        except (OSError, asyncio.TimeoutError) as error:  # ssl.SSLError is an OSError
            self._decide("client_tls_failed", "error", 0, detail=f"{type(error).__name__}: {error}")
            client_writer.transport.abort()
            return
        try:
            await self._serve(tls)
        finally:
            await close_tls(tls)

    async def _serve(self, tls: TlsStream) -> None:
        requests = RequestReader(
            tls.reader, max_head=MAX_REQUEST_HEAD, max_body=MAX_REQUEST_BODY, strict=self.strict_framing
        )
        while True:
            try:
                request = await bounded(requests.next_request(), self.idle_timeout)
            except (TimeoutError, asyncio.TimeoutError):
                if requests.leftover():  # part of a request arrived, the rest did not: slowloris
                    self._decide("client_timeout", "error", 0,
                                 detail=f"no complete request within {self.idle_timeout} s")
                return
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
        facts: dict[str, Any] = {"method": request.method, "target": request.target, "host": request.header("host")}
        decision = route_request(
            request.method, request.target, request.headers, len(request.body),
            routes=self.backend.routes, api_key=self.backend.api_key, host_header=self.backend.host_header,
            close_on_denied=self.close_on_denied,
        )
        if isinstance(decision, Deny):
            self._decide(decision.reason, "deny", DENIED_STATUS, detail=decision.detail, **facts)
            await _send_denial(client)
            return not decision.close
        facts["detail"] = f"route {decision.route}"
        try:
            # Serialisation, not routing: h11 refuses what it cannot write (e.g. a value it finds invalid).
            # Values go as the bytes that arrived (latin-1 round-trips them): obs-text (RFC 9110 §5.5) is a
            # legal field value, and h11 would ASCII-encode a str and raise UnicodeEncodeError on it.
            upstream_request = h11.Request(method=request.method, target=decision.target,
                                           headers=[(name.encode("latin-1"), value.encode("latin-1"))
                                                    for name, value in decision.headers])
        except (h11.LocalProtocolError, UnicodeError) as error:
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
        except _ClientGone as gone:
            # The client's side ended the exchange: not the backend's fault (never upstream_protocol_error).
            facts["detail"] += f": {gone}"
            self._decide("client_closed_mid_response", "error", 0, **facts)
            return False
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
            await drain(upstream_writer)
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
        await _to_client(client, _response_head(response.status_code, response.reason, headers))
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
            try:
                sock = self._socket_factory(family)
            except Exception as error:  # EMFILE, a closed lab helper: answered 502 and recorded, not raised
                failures.append(f"{address}: no socket to dial from: {type(error).__name__}: {error}")
                continue
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
        end = buffer.find(HEAD_END, offset)
        if end == -1:
            if len(buffer) - offset > MAX_RESPONSE_HEAD:
                raise EOFError(f"response head larger than {MAX_RESPONSE_HEAD} bytes")
            data = await asyncio.wait_for(reader.read(READ_SIZE), UPSTREAM_IDLE_TIMEOUT_SECONDS)
            if not data:
                raise EOFError("backend closed before a complete response head")
            buffer += data
            continue
        head = check_response_head(buffer[offset : end + len(HEAD_END)], max_head=MAX_RESPONSE_HEAD)
        offset = end + len(HEAD_END)
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
            data = await asyncio.wait_for(upstream_reader.read(READ_SIZE), UPSTREAM_IDLE_TIMEOUT_SECONDS)
            connection.receive_data(data)
        elif isinstance(event, h11.Data):
            relayed += len(event.data)
            if relayed > MAX_RESPONSE_BODY:
                raise EOFError(f"response larger than {MAX_RESPONSE_BODY} bytes")
            if event.data:
                # Written at once: an SSE token must not wait for the rest of the stream.
                await _to_client(client, b"%x\r\n%b\r\n" % (len(event.data), event.data) if chunked else event.data)
        elif isinstance(event, h11.EndOfMessage):
            if chunked:
                await _to_client(client, b"0\r\n\r\n")  # upstream trailers are dropped, never merged
            return
        else:
            raise EOFError(f"unexpected upstream event {type(event).__name__}")


async def _to_client(client: asyncio.StreamWriter, data: bytes) -> None:
    """Write to the client, bounded; its failure is the client's (:class:`_ClientGone`), not the backend's."""
    try:
        client.write(data)
        await drain(client)
    except (OSError, RuntimeError, asyncio.TimeoutError) as error:
        raise _ClientGone(f"client stopped reading mid-response: {type(error).__name__}: {error}") from None


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
