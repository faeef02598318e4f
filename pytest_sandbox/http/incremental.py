"""Framing as bytes arrive (push-style): the head splitter every reader uses, and the one upstream response framer.

Pure: nothing here reads a socket. A caller pushes the bytes it received and gets a complete message or
None (more is needed). :class:`ResponseFramer` is the only implementation of the upstream response rules
(RFC 9112 §6.3 message body length, interim 1xx responses, 101 refused, HEAD/204/304 without content,
strict chunked, the head and body limits, close-delimited bodies); the proxy's upstream connections
(``network/proxy/upstream.py``) drive it from ``data_received``. The checks of one head are
:func:`pytest_sandbox.http.framing.check_response_head`'s; chunked bodies are
:class:`pytest_sandbox.http.framing.ChunkedBodyParser`'s.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pytest_sandbox.http.fields import HeaderLookup
from pytest_sandbox.http.framing import (
    HEAD_END,
    MAX_RESPONSE_HEAD_BYTES,
    ChunkedBodyParser,
    FramingViolation,
    ResponseHead,
    check_response_head,
    first_bare_line_ending,
    frozen_instance,
)

__all__ = ["MAX_RESPONSE_BODY", "Response", "ResponseFramer", "decode_headers", "take_head"]

# The largest upstream response body the proxy buffers (decoded); larger is a 502.
MAX_RESPONSE_BODY = 32 * 2**20


def decode_headers(headers: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[str, str], ...]:
    """The str view of checked header fields: names are ASCII tokens (RFC 9110 §5.1), values latin-1."""
    return tuple((name.decode("ascii"), value.decode("latin-1")) for name, value in headers)


def take_head(buffer: bytearray, max_head: int, *, what: str, searched: int = 0) -> bytes | None:
    """Remove and return the head at the front of ``buffer`` (up to and including CRLFCRLF); None if incomplete.

    ``searched``: where an earlier call on this buffer, which returned None, left off (``len(buffer) - 3`` of
    then), so neither search starts again from the front: a head trickled in byte by byte costs linear time.
    Raises ``FramingViolation`` for a head over ``max_head`` bytes (431) and for a bare LF or CR already in
    the buffer: a head that uses bare line endings never contains CRLFCRLF, so it is judged now instead of
    waiting for bytes that never come (RFC 9112 §2.2).
    """
    end = buffer.find(HEAD_END, searched)
    if end == -1:
        if len(buffer) > max_head:
            raise FramingViolation("head-too-large", f"{what} head exceeds {max_head} bytes", 431)
        # The bytes before ``searched`` were judged by the earlier call, all but a trailing CR whose LF was
        # still in flight; that CR is at or after ``searched``. Start one byte earlier at an LF, so an LF is
        # judged with the byte before it.
        start = searched - 1 if searched and buffer[searched] == 0x0A else searched
        bare = first_bare_line_ending(bytes(buffer[start:]))
        if bare is not None:
            raise FramingViolation(bare, f"{what} line endings must be CRLF (RFC 9112 §2.2)")
        return None
    size = end + len(HEAD_END)
    head = bytes(buffer[:size])
    del buffer[:size]
    return head


@dataclass(frozen=True)
class Response(HeaderLookup):
    """One framed upstream response, body decoded."""

    http_version: str
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # names lowercased
    body: bytes
    keep_alive: bool  # False: the upstream connection must not carry another request
    raw_headers: tuple[tuple[bytes, bytes], ...] = field(default=(), repr=False, compare=False)


class ResponseFramer:
    """One response to a request with ``method``, framed strictly from the bytes fed to it.

    :meth:`feed` returns the :class:`Response` once complete (None while more is needed) and raises
    ``FramingViolation`` for bad framing: the caller answers 502 and never reuses that upstream connection,
    whose framing can no longer be trusted. :meth:`eof` is the upstream's EOF: it completes a response
    delimited by the close and raises ``asyncio.IncompleteReadError`` otherwise. ``leftover`` is what followed
    the response; a response with bytes after it is not ``keep_alive`` (nobody asked for them).
    """

    def __init__(self, method: str, *, max_head: int = MAX_RESPONSE_HEAD_BYTES,
                 max_body: int = MAX_RESPONSE_BODY) -> None:
        self._method = method
        self._max_head = max_head
        self._max_body = max_body
        self._buffer = bytearray()
        self._searched = 0  # where the search for the end of the head resumes
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
            return self._response(self._head, body, False)  # RFC 9112 §6.3 rule 8: the close ended it
        raise asyncio.IncompleteReadError(bytes(self._buffer), None)

    def _read_head(self) -> ResponseHead | None:
        buffer = self._buffer
        while True:
            head_bytes = take_head(buffer, self._max_head, what="response", searched=self._searched)
            if head_bytes is None:
                self._searched = max(0, len(buffer) - len(HEAD_END) + 1)
                return None
            self._searched = 0
            head = check_response_head(head_bytes, max_head=self._max_head)
            if head.status == 101:
                # This proxy never forwards Upgrade, so a 101 is an upstream framing error.
                raise FramingViolation("unexpected-101", "upstream switched protocols unasked", 502)
            if 100 <= head.status < 200:
                continue  # interim responses (RFC 9110 §15.2) are consumed, not forwarded
            break
        # RFC 9112 §6.3: HEAD responses and 204/304 never have content, whatever they declare.
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
        return frozen_instance(Response, http_version=head.http_version, status=head.status, reason=head.reason,
                               headers=decode_headers(head.headers), body=body, keep_alive=keep_alive,
                               raw_headers=head.headers)
