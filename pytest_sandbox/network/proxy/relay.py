"""Moving bytes without reading them: the CONNECT tunnel relay and the lingering close after a refusal.

Kept apart from the server because none of this judges anything: a thread per direction copying through a
buffer of its own (or stream copies on the event loop, when the client's bytes cannot be taken from its socket),
and a half-close that discards (never parses) what a refused client still sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable

from pytest_sandbox.http.framing import READ_SIZE
from pytest_sandbox.network.proxy.watchdog import bounded

__all__ = ["RELAY_CHUNK", "THREAD_RELAY", "linger_close", "pump_both_ways", "stream_buffered", "thread_relay"]

RELAY_CHUNK = 256 * 1024
_LINGER_SECONDS = 2.0
_LINGER_MAX_BYTES = 1 << 20
# The server reads this through the module (``relay.THREAD_RELAY``) so a test can switch the threads off.
THREAD_RELAY = True
# Per direction of a busy tunnel: room for a whole autotuned socket receive queue per recv(2); a direction
# starts with _FIRST_BUFFER and grows to this once a recv fills what it has, so an idle or interactive tunnel
# holds 128 KiB, not 2 MiB (a pipe, as splice used, held pages only while bytes were in it). Copied, not spliced:
# through a pipe, splice(2) moved fewer bytes per second in 11 of 12 paired runs, idle and under five loads
# (issue #12's twelfth pass, benchmarks/README.md). The receiver behind it paid more CPU per byte: the pipe hands
# the outgoing socket one 4 KiB page per fragment (skb_splice_from_iter), where send(2) from a buffer fills the
# 32 KiB page fragments a direct sender's packets carry.
_RELAY_BUFFER = 1 << 20
_FIRST_BUFFER = 64 * 1024
# SO_RCVTIMEO / SO_SNDTIMEO (socket(7)) on a tunnel's sockets: a blocked recv(2) or send(2) returns EAGAIN
# this often (a send that moved some bytes returns their count), so a thread re-checks whether its tunnel
# was stopped.
_WAIT_SECONDS = 1
_TIMEVAL = struct.pack("ll", _WAIT_SECONDS, 0)


async def linger_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, discard (never parse) what the client still sends for a moment, then close."""
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()
    discarded = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _LINGER_SECONDS
    with contextlib.suppress(OSError, ConnectionError, TimeoutError, asyncio.TimeoutError):
        while discarded < _LINGER_MAX_BYTES and loop.time() < deadline:
            data = await bounded(reader.read(READ_SIZE), deadline - loop.time())
            if not data:
                break
            discarded += len(data)
    writer.close()


def stream_buffered(reader: asyncio.StreamReader) -> bool:
    """Whether ``reader`` still holds bytes the client sent; unknown counts as yes.

    StreamReader has no public way to ask; its ``_buffer`` has been a bytearray since Python 3.4.
    Only then may the socket underneath be read directly.
    """
    buffer = getattr(reader, "_buffer", None)
    return not isinstance(buffer, bytearray) or bool(buffer)


class _ThreadedTunnel:
    """Both directions of a CONNECT tunnel, each moved by blocking ``recv_into``/``send`` in a thread of its own.

    Both calls release the GIL, so a bulk transfer costs the event loop nothing: no wake-up, no
    callback, no add_reader/remove_reader churn per chunk (measured: the event-loop relay spent its
    time in epoll round trips, not in moving bytes). Blocking calls on blocking sockets, so a chunk
    costs two system calls and no poll(2) or EAGAIN round trip. Each thread reads only once it has
    sent everything it read, so a slow receiver pauses the sender (TCP backpressure). At EOF it
    half-closes the receiving side (``shutdown(SHUT_WR)``), so the tunnel stays half open like a TCP
    connection.

    The tunnel owns duplicates of both descriptors (the caller has finished with them: the client
    transport's reading is paused and its writes drained): they are switched to blocking mode with
    ``SO_RCVTIMEO``/``SO_SNDTIMEO`` of ``_WAIT_SECONDS``, so no wait is unbounded. :meth:`stop` shuts
    both connections down (``shutdown(SHUT_RDWR)`` wakes a blocked call: a recv returns 0, a send fails
    with EPIPE), and the last thread to leave closes the duplicates, so a descriptor is never closed while
    a thread may still use it.
    """

    def __init__(self, first: socket.socket, second: socket.socket,
                 finished: Callable[[BaseException | None], None]) -> None:
        self._sockets = (first, second)
        self._finished = finished
        self._lock = threading.Lock()
        self._running = 2
        self._stopping = False
        self._threads = (
            threading.Thread(target=self._direction, args=(first, second), name="tunnel-up", daemon=True),
            threading.Thread(target=self._direction, args=(second, first), name="tunnel-down", daemon=True),
        )

    def start(self) -> None:
        for index, thread in enumerate(self._threads):
            try:
                thread.start()
            except RuntimeError as error:  # "can't start new thread": fail this tunnel, not the proxy
                self.stop()
                for _ in self._threads[index:]:
                    self._leave(error)
                return

    def stop(self) -> None:
        """Shut both connections down; the threads leave at their next recv or send."""
        with self._lock:
            self._stopping = True
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _direction(self, source: socket.socket, sink: socket.socket) -> None:
        error: BaseException | None = None
        buffer = bytearray(_FIRST_BUFFER)
        view = memoryview(buffer)
        try:
            while not self._stopping:
                try:
                    received = source.recv_into(buffer)
                except BlockingIOError:  # SO_RCVTIMEO: an idle tunnel; look at _stopping again
                    continue
                if received == 0:
                    with self._lock, contextlib.suppress(OSError):
                        if not self._stopping:
                            sink.shutdown(socket.SHUT_WR)
                    break
                sent = 0
                while sent < received:
                    try:  # not sendall: a send cut short by SO_SNDTIMEO returns what it sent, sendall drops that
                        sent += sink.send(view[sent:received])
                    except BlockingIOError:  # SO_SNDTIMEO with nothing sent: the receiver is slow
                        if self._stopping:
                            raise ConnectionAbortedError("tunnel stopped") from None
                if received == len(buffer) < _RELAY_BUFFER:  # a bulk transfer: take the whole queue per call
                    view.release()
                    buffer = bytearray(_RELAY_BUFFER)
                    view = memoryview(buffer)
        except OSError as failure:
            error = failure
        finally:
            view.release()
            self._leave(error)

    def _leave(self, error: BaseException | None) -> None:
        """One direction is done; the last one closes the duplicates (under the lock :meth:`stop` takes,
        so a shutdown never reaches a descriptor number that was closed and reused)."""
        with self._lock:
            self._running -= 1
            if self._running == 0:
                for sock in self._sockets:
                    sock.close()
        self._finished(error)


async def thread_relay(loop: asyncio.AbstractEventLoop, client_fd: int, upstream: socket.socket) -> None:
    """Relay between the client (a socket owned by an asyncio transport, reading paused) and the
    upstream socket until both directions reach EOF or either fails; both are shut down on the way
    out (cancellation included)."""
    done: asyncio.Future[None] = loop.create_future()
    open_directions = [2]

    def finished(error: BaseException | None) -> None:  # on the event loop
        open_directions[0] -= 1
        if error is not None and tunnel is not None:
            tunnel.stop()
        if not done.done() and (error is not None or open_directions[0] == 0):
            done.set_result(None)

    def finished_in_thread(error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody is waiting
            loop.call_soon_threadsafe(finished, error)

    # Duplicates: the transport and the caller keep (and close) their own descriptors.
    client = socket.socket(fileno=os.dup(client_fd))
    try:
        peer = socket.socket(fileno=os.dup(upstream.fileno()))
    except OSError:
        client.close()
        raise
    tunnel: _ThreadedTunnel | None = None
    try:
        for sock in (client, peer):  # the same open file descriptions as the caller's: see _ThreadedTunnel
            sock.settimeout(None)  # blocking, in the kernel (O_NONBLOCK off) and in Python (no poll before a call)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL)
        tunnel = _ThreadedTunnel(client, peer, finished_in_thread)
        tunnel.start()
        await done
    finally:
        if tunnel is None:
            # Set-up failed before a thread owned the duplicates: close them here, or they would hold the
            # client's connection open after the caller closed its own descriptor (the client would hang).
            client.close()
            peer.close()
        else:
            tunnel.stop()
        # O_NONBLOCK belongs to the open file description the duplicates share with the transport's and
        # the caller's sockets: give them back non-blocking, so nothing on the event loop can block on
        # them afterwards (a thread still inside recv or send then gets EAGAIN and leaves, as it is stopping).
        for fd in (client_fd, upstream.fileno()):
            with contextlib.suppress(OSError):
                os.set_blocking(fd, False)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy bytes until EOF, then half-close the sink; no per-chunk policy work on this path."""
    transport = sink.transport
    read = source.read
    write = transport.write
    while True:
        data = await read(RELAY_CHUNK)
        if not data:
            break
        write(data)
        if transport.get_write_buffer_size() > RELAY_CHUNK:
            await sink.drain()
    with contextlib.suppress(OSError, RuntimeError):
        if sink.can_write_eof():
            sink.write_eof()


async def pump_both_ways(
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
