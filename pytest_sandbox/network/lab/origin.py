"""The lab's public origins: HTTP/1.1 with keep-alive (h11) that keeps every byte and never refuses.

An origin is a positive control and a witness: what an allowed request delivered, byte for byte
(:class:`~pytest_sandbox.http.upstream.ReceivedStream`), and the requests h11 could frame
(:class:`OriginRequest`). It is not the parser under test, so it never refuses what it cannot frame.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Protocol

import h11

from pytest_sandbox.http.fields import HeaderLookup
from pytest_sandbox.http.upstream import MARK_HEADER, STREAM_RECORD_LIMIT, ReceivedStream
from pytest_sandbox.network.lab.connections import LabLoop, _Connection, _Listener

__all__ = ["ORIGIN_BODY_LIMIT", "ORIGIN_RECORD_LIMIT", "OriginLab", "OriginRequest"]

ORIGIN_RECORD_LIMIT = STREAM_RECORD_LIMIT
ORIGIN_BODY_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class OriginRequest(HeaderLookup):
    """One complete HTTP request an origin received, framed (by h11) from its connection's raw bytes.

    ``start``/``end`` locate the request in that connection's :class:`ReceivedStream` (the bytes
    ``stream.data[start:end]``, when the record was not truncated before ``end``).
    """

    origin: str
    port: int
    connection: int  # 1-based index of the connection on that listener: tells keep-alive reuse apart
    method: str
    target: str
    http_version: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    start: int = 0
    end: int = 0



class OriginLab(LabLoop, Protocol):
    """What an origin connection reports to: the lab's mark, its request log and its stream list."""

    @property
    def origin_mark(self) -> str: ...

    def record_request(self, request: OriginRequest) -> None: ...

    def add_stream(self, connection: _OriginConnection) -> None: ...


class _OriginConnection(_Connection):
    """HTTP/1.1 with keep-alive (h11): keep every byte, answer each request 200, mark every answer.

    The origin is not the parser under test, so it never refuses: bytes h11 cannot frame are kept
    (the raw record is the evidence), answered once with a marked 200 that says so, and the
    connection stays open and recorded until the peer closes or it idles out.
    """

    record_limit = ORIGIN_RECORD_LIMIT
    lab: OriginLab

    def __init__(self, lab: OriginLab, listener: _Listener, sock: socket.socket, index: int) -> None:
        self.http = h11.Connection(h11.SERVER)
        self._request: h11.Request | None = None
        self._request_start = 0
        self._body = bytearray()
        self.received = 0  # every byte delivered, also past record_limit
        self._fed = 0  # bytes given to h11
        self._unframed = False  # h11 gave up: the rest is only recorded
        self.arrivals: list[tuple[float, int]] = []  # (when, bytes received in all by then)
        super().__init__(lab, listener, sock, index)
        lab.add_stream(self)

    def read_available(self) -> tuple[list[bytes], bool]:
        chunks, eof = super().read_available()
        if chunks:
            self.received += sum(len(chunk) for chunk in chunks)
            self.arrivals.append((time.monotonic(), self.received))
        return chunks, eof

    def stream(self) -> ReceivedStream:
        address, port = self.listener.key
        host = f"[{address}]" if ":" in address else address
        return ReceivedStream(f"{host}:{port}", self.index, bytes(self.record), self.received, tuple(self.arrivals))

    def handle(self, chunks: list[bytes], eof: bool) -> None:
        if not self._unframed:
            for chunk in chunks:
                self.http.receive_data(chunk)
                self._fed += len(chunk)
            if eof:
                with contextlib.suppress(RuntimeError):
                    self.http.receive_data(b"")
            self._process_events()
        if eof and not self.closed and not self._outgoing:
            self.close()

    def _offset(self) -> int:
        """Bytes of this connection h11 has consumed so far."""
        return self._fed - len(self.http.trailing_data[0])

    def _process_events(self) -> None:
        while not self.closed:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                self._unframeable(exc)
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
                    self.http.start_next_cycle()
                    continue
                return
            if isinstance(event, h11.Request):
                self._request = event
                self._body.clear()
            elif isinstance(event, h11.Data):
                room = ORIGIN_BODY_LIMIT - len(self._body)
                self._body += event.data[:max(room, 0)]
            elif isinstance(event, h11.EndOfMessage):
                self._answer()
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _answer(self) -> None:
        request = self._request
        assert request is not None
        address, port = self.listener.key
        end = self._offset()
        recorded = OriginRequest(
            origin=address,
            port=port,
            connection=self.index,
            method=request.method.decode("latin-1"),
            target=request.target.decode("latin-1"),
            http_version=request.http_version.decode("latin-1"),
            headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers),
            body=bytes(self._body),
            start=self._request_start,
            end=end,
        )
        self._request_start = end
        self.lab.record_request(recorded)
        # An origin is not a proxy: refuse CONNECT (RFC 9110 §9.3.6) rather than start a tunnel.
        status, reason = (405, b"Method Not Allowed") if recorded.method == "CONNECT" else (200, b"OK")
        body = f"origin {address} port {port}: {recorded.method} {recorded.target}\n".encode()
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                   ("X-Lab-Origin", address), (MARK_HEADER, self.lab.origin_mark)]
        if status == 405:
            headers.append(("Connection", "close"))
        payload = self.http.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
        if recorded.method != "HEAD":
            # RFC 9110 §9.3.2: the answer to HEAD is the GET answer's head alone (Content-Length
            # included, §8.6); h11 refuses body data for it.
            payload += self.http.send(h11.Data(data=body)) or b""
        payload += self.http.send(h11.EndOfMessage()) or b""
        self.send(payload, then_close=self.http.our_state is h11.MUST_CLOSE)

    def _unframeable(self, error: h11.RemoteProtocolError) -> None:
        """Keep recording; answer once (marked) if no response is under way, so the peer is not left
        waiting on the origin. Never a refusal: the judges read the raw record, not this answer."""
        self._unframed = True
        if self.http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        address, port = self.listener.key
        body = (f"origin {address} port {port}: could not frame the bytes from offset "
                f"{self._request_start} ({error}); every byte is recorded\n").encode()
        self.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                  + f"Content-Length: {len(body)}\r\nX-Lab-Origin: {address}\r\n".encode()
                  + f"{MARK_HEADER}: {self.lab.origin_mark}\r\nX-Lab-Unframed: 1\r\n\r\n".encode() + body)
