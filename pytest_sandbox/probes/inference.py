"""The inference client side: requests inside ``CONNECT inference.local:443`` + TLS, and reading the answers.

What a conformance test or the smuggling probe sends to the interceptor (network.md §4), over sockets
the caller gives it (lab sockets only); the answers are read with the one blocking read loop
(:class:`~pytest_sandbox.probes.exchange.SocketReader`) and the one lenient response parser.
"""

from __future__ import annotations

import functools
import socket
import ssl
import time
from collections.abc import Iterable

from pytest_sandbox.http.framing import HEAD_END
from pytest_sandbox.http.responses import ParsedResponse
from pytest_sandbox.inference.routes import METHODS_WITH_CONTENT
from pytest_sandbox.inference.routing import INFERENCE_HOST, INFERENCE_PORT
from pytest_sandbox.probes.exchange import SocketReader

__all__ = [
    "ATTEMPT_TIMEOUT_SECONDS",
    "answer_to",
    "closes_without_more_bytes",
    "inference_request",
    "open_inference_tunnel",
    "send_and_read",
]

ATTEMPT_TIMEOUT_SECONDS = 3.0


def inference_request(method: str, target: str, *, body: bytes = b"", host: str = INFERENCE_HOST,
                      headers: Iterable[tuple[str, str]] = (), http_version: str = "1.1", framing: str = "") -> bytes:
    """One raw HTTP/1.1 (or ``http_version``) request. Its body, when it has one or its method defines one, is
    framed by Content-Length, or as ``framing`` says (``BODY_FRAMINGS``): ``chunked`` (one chunk, then the last
    chunk), ``expect-continue`` (Content-Length and ``Expect: 100-continue``, the body sent at once, as curl does
    after its one-second wait). Pure."""
    lines = [f"{method} {target} HTTP/{http_version}", f"Host: {host}",
             *(f"{name}: {value}" for name, value in headers)]
    if framing == "chunked":
        lines += ["Transfer-Encoding: chunked", "Content-Type: application/json"]
        chunks = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + chunks
    if body or method in METHODS_WITH_CONTENT or framing:
        lines += [f"Content-Length: {len(body)}", "Content-Type: application/json"]
    if framing == "expect-continue":
        lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body



@functools.lru_cache(maxsize=8)
def _client_context(ca_pem: bytes) -> ssl.SSLContext:
    """A TLS client context trusting only ``ca_pem`` (made once per CA: a campaign opens hundreds of tunnels,
    and a context costs about 0.7 ms; an SSLContext may be shared by threads)."""
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    context.set_alpn_protocols(["http/1.1"])
    return context


def open_inference_tunnel(sock: socket.socket, ca_pem: bytes, *, timeout: float = ATTEMPT_TIMEOUT_SECONDS,
                          authority: str = f"{INFERENCE_HOST}:{INFERENCE_PORT}") -> ssl.SSLSocket:
    """``CONNECT inference.local:443`` on ``sock``, then TLS trusting only ``ca_pem``.

    Raises ConnectionError when the proxy does not answer 200.
    """
    sock.settimeout(timeout)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode("ascii"))
    reply = b""
    while HEAD_END not in reply:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"the proxy closed before answering CONNECT: {reply!r}")
        reply += data
    if not reply.startswith(b"HTTP/1.1 200"):
        status_line = reply.partition(b"\r\n")[0]
        raise ConnectionError(f"CONNECT {authority} was answered {status_line!r}")
    tls = _client_context(ca_pem).wrap_socket(sock, server_hostname=INFERENCE_HOST)
    tls.settimeout(timeout)
    return tls



def send_and_read(sock: socket.socket, request: bytes, *, count: int = 1,
                  timeout: float = ATTEMPT_TIMEOUT_SECONDS) -> tuple[list[ParsedResponse], bool]:
    """Send ``request`` and read until ``count`` responses arrived, EOF or the deadline.

    Returns (responses, closed): ``closed`` is True only if EOF or a reset was already seen.
    """
    reader = SocketReader(sock, time.monotonic() + timeout, bytearray())
    try:
        sock.sendall(request)
    except (OSError, ssl.SSLError):
        return [], True
    reader.fill(lambda: len(reader.responses()) >= count)
    return reader.responses(), reader.eof


def answer_to(sock: socket.socket, request: bytes, *,
              timeout: float = ATTEMPT_TIMEOUT_SECONDS) -> ParsedResponse | None:
    """The first response ``request`` gets on this connection, or None (closed, reset, nothing)."""
    responses, _closed = send_and_read(sock, request, timeout=timeout)
    return responses[0] if responses else None


def closes_without_more_bytes(sock: socket.socket, *, timeout: float = ATTEMPT_TIMEOUT_SECONDS) -> bool:
    """True if the peer closes (EOF or reset) before the deadline without sending anything more."""
    reader = SocketReader(sock, time.monotonic() + timeout, bytearray())
    reader.fill(lambda: bool(reader.buffer))
    return reader.eof and not reader.buffer
