"""The lab's accepted connections and listeners: non-blocking sockets read by hand on the lab's loop.

Read by hand (not asyncio Transports) so that a *settle* can drain every byte the kernel already
delivered before a query answers. The catch-all's connection lives here; the public origin's HTTP
connection (``origin.py``) builds on :class:`_Connection`. They reach the lab only through
:class:`LabLoop`, so this module never imports ``lab.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Protocol

from pytest_sandbox.http.framing import HEAD_END, READ_SIZE
from pytest_sandbox.network.lab.attribution import CatchAllHit

__all__ = ["CANARY_RECORD_LIMIT", "LabLoop", "ListenerKey"]

CANARY_RECORD_LIMIT = 4096
ListenerKey = tuple[str, int]  # (canonical address, port)


class LabLoop(Protocol):
    """What a connection needs from its lab: the loop it runs on, its idle timeout, and a way out."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def idle_timeout(self) -> float: ...

    def forget(self, connection: _Connection) -> None:
        """The connection closed: drop it from the lab's open connections."""
        ...


def _original_destination(sock: socket.socket) -> tuple[str, int]:
    """The address a transparent (TPROXY) socket was connected to: its own local address."""
    local = sock.getsockname()
    text = str(local[0]).split("%", 1)[0]  # a link-local address may come back with its scope
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(local[1])


@dataclass
class _HitRecord:
    """A catch-all hit while it is still open (its bytes keep arriving)."""

    index: int
    at: float
    address: str
    port: int
    received: bytearray

    def frozen(self) -> CatchAllHit:
        return CatchAllHit(self.index, self.at, self.address, self.port, bytes(self.received))


# --------------------------------------------------------------------------------------------------
# Connections (all methods run on the lab's loop thread)
# --------------------------------------------------------------------------------------------------


@dataclass
class _Listener:
    key: ListenerKey
    role: str  # "catch-all" or "origin"
    sock: socket.socket
    accepted: int = 0
    records: list[bytearray] = field(default_factory=list)


class _Connection:
    """A non-blocking accepted socket read by hand (not a Transport) so that a settle can read it."""

    record_limit = CANARY_RECORD_LIMIT

    def __init__(self, lab: LabLoop, listener: _Listener, sock: socket.socket, index: int) -> None:
        self.lab = lab
        self.listener = listener
        self.sock = sock
        self.index = index
        self.record = bytearray()
        listener.records.append(self.record)
        self.closed = False
        self._outgoing = bytearray()
        self._close_after_flush = False
        self._writer_registered = False
        self._idle_timer: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        lab.loop.add_reader(sock.fileno(), self.on_readable)
        self._touch()

    def _touch(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self.lab.loop.call_later(self.lab.idle_timeout, self.close)

    def read_available(self) -> tuple[list[bytes], bool]:
        """Read everything the kernel has delivered; return (chunks, eof)."""
        chunks: list[bytes] = []
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return chunks, False
            except OSError:
                return chunks, True
            if not data:
                return chunks, True
            room = self.record_limit - len(self.record)
            if room > 0:
                self.record += data[:room]
            chunks.append(data)

    def on_readable(self) -> None:
        """Read what arrived (it resets the idle timer) and hand it to :meth:`handle`."""
        if self.closed:
            return
        chunks, eof = self.read_available()
        if chunks:
            self._touch()
        self.handle(chunks, eof)

    def handle(self, chunks: list[bytes], eof: bool) -> None:
        """React to newly read ``chunks`` (already recorded) and to EOF."""
        raise NotImplementedError

    def send(self, data: bytes, *, then_close: bool = False) -> None:
        self._outgoing += data
        self._close_after_flush = self._close_after_flush or then_close
        self._flush()

    def _flush(self) -> None:
        if self.closed:
            return
        while self._outgoing:
            try:
                sent = self.sock.send(self._outgoing)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._outgoing.clear()
                break
            del self._outgoing[:sent]
        if self._outgoing and not self._writer_registered:
            self.lab.loop.add_writer(self.sock.fileno(), self._flush)
            self._writer_registered = True
        elif not self._outgoing:
            if self._writer_registered:
                self.lab.loop.remove_writer(self.sock.fileno())
                self._writer_registered = False
            if self._close_after_flush:
                self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        loop = self.lab.loop
        loop.remove_reader(self.sock.fileno())
        if self._writer_registered:
            loop.remove_writer(self.sock.fileno())
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        # Read what is left so that close() sends FIN rather than RST where possible: an RST can
        # make the peer drop our response before it reads it (RFC 9293 §3.6.1, "abort").
        self.read_available()
        self.sock.close()
        self.lab.forget(self)


class _CatchAllConnection(_Connection):
    """Record up to 4 KiB, then answer a minimal HTTP 200 that names the original destination, and close."""

    responded = False

    def __init__(self, lab: LabLoop, listener: _Listener, sock: socket.socket, index: int,
                 hit: _HitRecord) -> None:
        super().__init__(lab, listener, sock, index)
        self.hit = hit
        hit.received = self.record

    def handle(self, chunks: list[bytes], eof: bool) -> None:
        if self.responded:
            return
        head_complete = HEAD_END in self.record
        if head_complete or eof or len(self.record) >= self.record_limit:
            self.responded = True
            address, port = self.hit.address, self.hit.port
            body = f"canary {address} port {port}\n".encode()
            self.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"X-Lab-Canary: {address}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body,
                then_close=True,
            )
