"""The proxy's upstream connections: a strict response framer fed by a protocol, one callback per response.

``ResponseFramer`` is pure: it is fed the bytes an upstream sends and returns the response once it is
complete, judging the framing exactly as ``http.streams.ResponseReader`` does (RFC 9112 §6.3). Here it is
driven by ``data_received`` instead of awaited reads, so an upstream response costs the event loop one
callback, not a task wake-up per read (each wake-up is one more pass of the loop: another epoll_wait and
another trip through the scheduler, which is most of what a keep-alive GET costs the proxy).

``UpstreamConnection`` is one connection to one checked (address, port). A response is delivered to the
``done`` callback given with its request; a coroutine awaits :meth:`UpstreamConnection.round_trip`.
Bytes an upstream sends while no request is outstanding, or its EOF, make the connection unusable: it is
never reused (a response nobody asked for means the connection's framing is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from pytest_sandbox.http.framing import (
    HEAD_END,
    MAX_RESPONSE_HEAD_BYTES,
    ChunkedBodyParser,
    FramingViolation,
    ResponseHead,
    check_response_head,
    first_bare_line_ending,
)
from pytest_sandbox.http.streams import Reserve, Response

__all__ = ["ResponseFramer", "UpstreamConnection"]

Outcome = Response | BaseException


def _decode(headers: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((name.decode("ascii"), value.decode("latin-1")) for name, value in headers)


class ResponseFramer:
    """One response to a request with ``method``, framed strictly from the bytes fed to it.

    :meth:`feed` returns the :class:`Response` once complete (None while more is needed) and raises
    ``FramingViolation`` for bad framing; :meth:`eof` is the upstream's EOF: it completes a response
    delimited by the close (no Content-Length, not chunked) and raises ``asyncio.IncompleteReadError``
    otherwise. Interim 1xx responses are consumed (RFC 9110 §15.2), a 101 is refused (this proxy never
    forwards Upgrade), and HEAD, 204 and 304 responses have no content whatever they declare (§6.3).
    """

    def __init__(self, method: str, *, max_head: int = MAX_RESPONSE_HEAD_BYTES, max_body: int = 32 * 2**20) -> None:
        self._method = method
        self._max_head = max_head
        self._max_body = max_body
        self._buffer = bytearray()
        self._head: ResponseHead | None = None
        self._mode = ""  # "none" | "length" | "chunked" | "eof", once the final head is read
        self._chunked: ChunkedBodyParser | None = None

    @property
    def leftover(self) -> bytes:
        return bytes(self._buffer)

    def feed(self, data: bytes) -> Response | None:
        self._buffer += data
        head = self._head or self._read_head()
        if head is None:
            return None
        buffer = self._buffer
        if self._mode == "length":
            length = head.content_length or 0
            if len(buffer) < length:
                return None
            body = bytes(buffer[:length])
            del buffer[:length]
        elif self._mode == "chunked":
            assert self._chunked is not None
            result = self._chunked.feed(bytes(buffer))
            buffer.clear()
            if result is None:
                return None
            buffer += result.leftover
            body = result.body
        elif self._mode == "eof":
            if len(buffer) > self._max_body:
                raise FramingViolation("body-too-large", f"body exceeds {self._max_body} bytes", 502)
            return None
        else:
            body = b""
        return self._response(head, body, head.keep_alive and not buffer)

    def eof(self) -> Response:
        if self._head is not None and self._mode == "eof":
            body = bytes(self._buffer)
            self._buffer.clear()
            return self._response(self._head, body, False)
        raise asyncio.IncompleteReadError(bytes(self._buffer), None)

    def _read_head(self) -> ResponseHead | None:
        buffer = self._buffer
        while True:
            end = buffer.find(HEAD_END)
            if end == -1:
                if len(buffer) > self._max_head:
                    raise FramingViolation("head-too-large", f"response head exceeds {self._max_head} bytes", 431)
                if buffer:
                    # A head that uses bare LF never contains CRLFCRLF: judge it now instead of waiting.
                    bare = first_bare_line_ending(bytes(buffer))
                    if bare is not None:
                        raise FramingViolation(bare, "response line endings must be CRLF (RFC 9112 §2.2)")
                return None
            head_bytes = bytes(buffer[: end + len(HEAD_END)])
            del buffer[: end + len(HEAD_END)]
            head = check_response_head(head_bytes, max_head=self._max_head)
            if head.status == 101:
                raise FramingViolation("unexpected-101", "upstream switched protocols unasked", 502)
            if 100 <= head.status < 200:
                continue  # interim responses (RFC 9110 §15.2) are consumed, not forwarded
            break
        if self._method == "HEAD" or head.status in (204, 304):
            self._mode = "none"
        elif head.chunked:
            self._mode = "chunked"
            self._chunked = ChunkedBodyParser(max_body=self._max_body)
        elif head.content_length is not None:
            if head.content_length > self._max_body:
                raise FramingViolation("body-too-large", "upstream body too large", 502)
            self._mode = "length"
        else:
            self._mode = "eof"  # RFC 9112 §6.3 rule 8: the body ends when the connection closes
        self._head = head
        return head

    @staticmethod
    def _response(head: ResponseHead, body: bytes, keep_alive: bool) -> Response:
        return Response(http_version=head.http_version, status=head.status, reason=head.reason,
                        headers=_decode(head.headers), body=body, keep_alive=keep_alive, raw_headers=head.headers)


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection, dialled to the checked ``key`` (address, port); one request at a time.

    ``reserve`` (the proxy's memory budget) is charged before received bytes are kept; whatever it raises
    is delivered as the outcome, and so is any ``FramingViolation``, ``OSError`` or
    ``asyncio.IncompleteReadError`` (the upstream closed before its response was complete).
    """

    def __init__(self, key: tuple[str, int], *, max_body: int, reserve: Reserve | None) -> None:
        self.key = key
        self._max_body = max_body
        self._reserve = reserve
        self.transport: asyncio.Transport | None = None
        self._framer: ResponseFramer | None = None
        self._done: Callable[[Outcome], None] | None = None
        self.usable = True  # False once closed, or once it sent bytes nobody asked for

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, method: str, done: Callable[[Outcome], None]) -> None:
        """Write one request; ``done`` gets its response (or the failure) from the event loop."""
        transport = self.transport
        if transport is None or transport.is_closing():
            done(asyncio.IncompleteReadError(b"", None))
            return
        self._framer = ResponseFramer(method, max_body=self._max_body)
        self._done = done
        transport.write(data)

    async def round_trip(self, data: bytes, method: str) -> Response:
        """:meth:`send`, awaited."""
        answered: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        def done(outcome: Outcome) -> None:
            if answered.done():
                return
            if isinstance(outcome, BaseException):
                answered.set_exception(outcome)
            else:
                answered.set_result(outcome)

        self.send(data, method, done)
        return await answered

    def data_received(self, data: bytes) -> None:
        framer = self._framer
        if framer is None:  # a response to no request: this connection's framing is lost
            self.usable = False
            self.abort()
            return
        try:
            if self._reserve is not None:
                self._reserve(len(data))
            response = framer.feed(data)
        except Exception as error:  # FramingViolation, or the memory budget refusing the bytes
            self.usable = False
            self._deliver(error)
            return
        if response is not None:
            if not response.keep_alive:
                self.usable = False
            self._deliver(response)

    def eof_received(self) -> bool:
        self.usable = False
        framer = self._framer
        if framer is not None:
            try:
                outcome: Outcome = framer.eof()
            except asyncio.IncompleteReadError as error:
                outcome = error
            self._deliver(outcome)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self.transport = None
        if self._framer is not None:
            self._deliver(exc if exc is not None else asyncio.IncompleteReadError(b"", None))

    def _deliver(self, outcome: Outcome) -> None:
        done = self._done
        self._framer = self._done = None
        if done is not None:
            done(outcome)

    def close(self) -> None:
        self.usable = False
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.close()

    def abort(self) -> None:
        """Drop the connection now (a deadline passed): the pending request fails with the close."""
        self.usable = False
        transport: Any = self.transport
        if transport is not None:
            transport.abort()
