"""Async HTTP/1.1 message readers and writers over asyncio streams, framed strictly.

``RequestReader`` returns one request at a time, each separately even when a client pipelines
several in one write, and never *consumes* bytes past the current request: whatever was read from
the socket beyond it stays in ``leftover()`` and is the start of the next request. The framing
decisions themselves live in :mod:`pytest_sandbox.http.framing` (pure); this module only moves bytes.
Upstream responses have no reader here: the proxy's upstream protocol feeds them to the one push-style
:class:`pytest_sandbox.http.incremental.ResponseFramer`.

``strict=False`` swaps the strict checks for h11 0.16 alone. It exists so a conformance suite can
prove that it detects what h11 lets through (network.md §5, "h11 0.16 accepts"); never use it to
serve anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11

from pytest_sandbox.http.fields import HeaderLookup
from pytest_sandbox.http.framing import (
    HEAD_END,
    MAX_HEAD_BYTES,
    READ_SIZE,
    ChunkedBodyParser,
    FramingViolation,
    check_request_head,
)
from pytest_sandbox.http.incremental import decode_headers, take_head

__all__ = [
    "DEFAULT_MAX_BODY",
    "Request",
    "RequestReader",
    "response_bytes",
    "write_json_refusal",
    "write_response",
]

DEFAULT_MAX_BODY = 10 * 2**20
# ``reserve(n)`` is called before ``n`` more bytes are buffered; it raises to refuse them (a memory budget).
Reserve = Callable[[int], None]


@dataclass(frozen=True)
class Request(HeaderLookup):
    """One framed request. ``raw`` is exactly the bytes consumed for it (head and encoded body)."""

    method: str
    target: str
    http_version: str  # "1.1" / "1.0"
    headers: tuple[tuple[str, str], ...]  # names lowercased, values latin-1 decoded, in order
    body: bytes  # decoded (chunked coding removed)
    raw: bytes
    # The same fields as bytes (lowercase names), so a forwarder need not re-encode them.
    raw_headers: tuple[tuple[bytes, bytes], ...] = field(default=(), repr=False, compare=False)

    @property
    def keep_alive(self) -> bool:
        """Whether the client lets the connection carry another request after this one.

        HTTP/1.0 always closes here, even with ``Connection: keep-alive`` (RFC 9112 App. C.2.2:
        a proxy must not assume 1.0 keep-alive survives the hop).
        """
        if self.http_version != "1.1":
            return False
        for name, value in self.headers:
            if name == "connection" and "close" in (token.strip().lower() for token in value.split(",")):
                return False
        return True


class _BufferedStream:
    """A byte buffer in front of a StreamReader; framing decisions never look at unread bytes."""

    def __init__(self, reader: asyncio.StreamReader, reserve: Reserve | None = None) -> None:
        self.source = reader
        self.buffer = bytearray()
        self.reserve = reserve

    async def fill(self) -> bool:
        """Read more bytes; False on EOF. ``reserve`` (a memory budget) is charged before they are kept."""
        data = await self.source.read(READ_SIZE)
        if not data:
            return False
        if self.reserve is not None:
            self.reserve(len(data))
        self.buffer += data
        return True

    async def read_head(self, max_head: int, *, what: str) -> bytes | None:
        """The next head up to and including CRLFCRLF; None on EOF before any byte of it."""
        searched = 0
        while True:
            head = take_head(self.buffer, max_head, what=what, searched=searched)
            if head is not None:
                return head
            searched = max(0, len(self.buffer) - len(HEAD_END) + 1)
            if not await self.fill():
                if not self.buffer:
                    return None
                raise asyncio.IncompleteReadError(bytes(self.buffer), None)

    async def read_exactly(self, length: int) -> bytes:
        while len(self.buffer) < length:
            if not await self.fill():
                raise asyncio.IncompleteReadError(bytes(self.buffer), length)
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        return data

    async def read_chunked(self, max_body: int, lax: frozenset[str] = frozenset()) -> tuple[bytes, bytes]:
        """(decoded body, encoded bytes consumed); the bytes after it stay buffered."""
        parser = ChunkedBodyParser(max_body=max_body, lax=lax)
        fed: list[bytes] = []
        data = bytes(self.buffer)
        while True:
            fed.append(data)
            result = parser.feed(data)
            if result is not None:
                self.buffer = bytearray(result.leftover)
                return result.body, b"".join(fed)[: result.consumed]
            self.buffer.clear()
            if not await self.fill():
                raise asyncio.IncompleteReadError(b"".join(fed), None)
            data = bytes(self.buffer)


class RequestReader:
    """Reads requests one at a time from a client stream, framed strictly.

    ``next_request`` returns None on a clean EOF between requests, raises ``FramingViolation`` for
    any framing problem (the caller answers ``violation.status`` and closes), and raises
    ``asyncio.IncompleteReadError`` if the peer closes mid-request.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        *,
        max_head: int = MAX_HEAD_BYTES,
        max_body: int = DEFAULT_MAX_BODY,
        strict: bool = True,
        reserve: Reserve | None = None,
        lax: frozenset[str] = frozenset(),
    ) -> None:
        self._stream = _BufferedStream(reader, reserve)
        self._max_head = max_head
        self._max_body = max_body
        self._strict = strict
        self._lax = lax  # framing families read leniently (framing.FRAMING_FAMILIES; weakened proxies only)

    def leftover(self) -> bytes:
        """Bytes read from the socket but not consumed by any returned request."""
        return bytes(self._stream.buffer)

    async def next_request(self) -> Request | None:
        if not self._strict:
            return await self._next_request_h11_only()
        head_bytes = await self._stream.read_head(self._max_head, what="request")
        if head_bytes is None:
            return None
        head = check_request_head(head_bytes, max_head=self._max_head, lax=self._lax)
        kind, length = head.body_framing
        if kind == "chunked":
            body, encoded = await self._stream.read_chunked(self._max_body, self._lax)
        elif length:
            if length > self._max_body:
                raise FramingViolation("body-too-large", f"body exceeds {self._max_body} bytes", 413)
            body = encoded = await self._stream.read_exactly(length)
        else:
            body = encoded = b""
        return Request(
            method=head.method,
            target=head.target,
            http_version=head.http_version,
            headers=decode_headers(head.headers),
            body=body,
            raw=head_bytes + encoded,
            raw_headers=head.headers,
        )

    async def _next_request_h11_only(self) -> Request | None:
        """The weakened reader: whatever h11 0.16 accepts is a request."""
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        fed = [bytes(self._stream.buffer)]
        if fed[0]:  # receive_data(b"") means EOF to h11
            connection.receive_data(fed[0])
        self._stream.buffer.clear()
        start: h11.Request | None = None
        body: list[bytes] = []
        size = 0
        while True:
            try:
                event: Any = connection.next_event()
            except h11.RemoteProtocolError as error:
                raise FramingViolation("h11", str(error), error.error_status_hint) from None
            if event is h11.NEED_DATA:
                data = await self._stream.source.read(READ_SIZE)
                if not data and start is None and not b"".join(fed):
                    return None
                fed.append(data)
                connection.receive_data(data)
            elif isinstance(event, h11.Request):
                start = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._max_body:
                    raise FramingViolation("body-too-large", f"body exceeds {self._max_body} bytes", 413)
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage) and start is not None:
                raw_headers = tuple((bytes(name), bytes(value)) for name, value in start.headers)
                leftover = connection.trailing_data[0]
                everything = b"".join(fed)
                self._stream.buffer = bytearray(leftover)
                return Request(
                    method=start.method.decode("ascii"),
                    target=start.target.decode("latin-1"),
                    http_version=start.http_version.decode("ascii"),
                    headers=decode_headers(raw_headers),
                    body=b"".join(body),
                    raw=everything[: len(everything) - len(leftover)],
                    raw_headers=raw_headers,
                )
            elif isinstance(event, h11.ConnectionClosed):
                if start is None and not b"".join(fed):
                    return None
                raise asyncio.IncompleteReadError(b"".join(fed), None)


def _encode_field(name: str, value: str) -> bytes:
    if "\r" in name or "\n" in name or ":" in name or "\r" in value or "\n" in value:
        raise ValueError(f"refusing to write a field that would split the header section: {name!r}")
    return b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))


def response_bytes(status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """Serialise a response; adds Content-Length unless the headers frame the body themselves."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1"))]
    framed = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == "content-length" or lowered == "transfer-encoding":
            framed = True
        parts.append(_encode_field(name, value))
    if not framed and status >= 200 and status not in (204, 304):
        parts.append(b"content-length: %d\r\n" % len(body))
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


async def write_response(
    writer: asyncio.StreamWriter, status: int, reason: str, headers: list[tuple[str, str]], body: bytes
) -> None:
    """Write one response (Content-Length added when the headers do not frame the body)."""
    writer.write(response_bytes(status, reason, headers, body))
    await writer.drain()


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def write_json_refusal(
    writer: asyncio.StreamWriter, status: int, payload: dict[str, Any], *, close: bool = True
) -> None:
    """Answer ``status`` with a JSON body; with ``close``, send ``Connection: close`` and close.

    Closing half-closes first (FIN after the response) so a client that pipelined more bytes still
    reads the refusal before it sees EOF.
    """
    headers = [("content-type", "application/json")]
    if close:
        headers.append(("connection", "close"))
    body = json.dumps(payload, separators=(",", ":")).encode()
    with contextlib.suppress(ConnectionError):
        await write_response(writer, status, _reason_phrase(status), headers, body)
    if close:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
