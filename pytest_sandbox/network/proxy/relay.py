"""Moving bytes without reading them: the CONNECT tunnel relay and the lingering close after a refusal.

Kept apart from the server because none of this judges anything: ``splice(2)`` through a pipe when the
platform has it, plain stream copies otherwise, and a half-close that discards (never parses) what a
refused client still sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable

from pytest_sandbox.http.framing import READ_SIZE
from pytest_sandbox.network.proxy.watchdog import bounded

__all__ = ["RELAY_CHUNK", "SPLICE_AVAILABLE", "linger_close", "pump_both_ways", "splice_relay", "stream_buffered"]

RELAY_CHUNK = 256 * 1024
_LINGER_SECONDS = 2.0
_LINGER_MAX_BYTES = 1 << 20
# The server reads this through the module (``relay.SPLICE_AVAILABLE``) so a test can switch splice off.
SPLICE_AVAILABLE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0)
# fcntl(2) F_SETPIPE_SZ: room for a whole socket receive queue per splice (the default is 64 KiB).
_PIPE_SIZE = 1 << 20
# SO_RCVTIMEO / SO_SNDTIMEO (socket(7)) on a tunnel's sockets: a blocked splice(2) returns EAGAIN this
# often, so a thread re-checks whether its tunnel was stopped; tcp_splice_read honours the receive timeout.
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


class _SplicedTunnel:
    """Both directions of a CONNECT tunnel, each moved by blocking ``splice(2)`` in a thread of its own.

    ``os.splice`` releases the GIL, so a bulk transfer costs the event loop nothing: no wake-up, no
    callback, no add_reader/remove_reader churn per chunk (measured: the event-loop relay spent its
    time in epoll round trips, not in moving bytes). Blocking calls on blocking sockets, so a chunk
    costs two system calls (socket -> pipe, pipe -> socket) and no poll(2) or EAGAIN round trip. Each
    thread reads only while its pipe is empty, so a slow receiver pauses the sender (TCP
    backpressure). At EOF it half-closes the receiving side (``shutdown(SHUT_WR)``), so the tunnel
    stays half open like a TCP connection.

    The tunnel owns duplicates of both descriptors (the caller has finished with them: the client
    transport's reading is paused and its writes drained): they are switched to blocking mode with
    ``SO_RCVTIMEO``/``SO_SNDTIMEO`` of ``_WAIT_SECONDS``, so no wait is unbounded. :meth:`stop` shuts
    both connections down (``shutdown(SHUT_RDWR)`` wakes a blocked splice: it returns 0 or fails with
    EPIPE), and the last thread to leave closes the duplicates, so a descriptor is never closed while
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
        """Shut both connections down; the threads leave at their next splice or poll."""
        with self._lock:
            self._stopping = True
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _direction(self, source: socket.socket, sink: socket.socket) -> None:
        error: BaseException | None = None
        pipe_out, pipe_in = os.pipe2(os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            source_fd, sink_fd = source.fileno(), sink.fileno()
            while not self._stopping:
                try:
                    moved = os.splice(source_fd, pipe_in, _PIPE_SIZE, flags=_SPLICE_FLAGS)
                except BlockingIOError:  # SO_RCVTIMEO: an idle tunnel; look at _stopping again
                    continue
                if moved == 0:
                    with self._lock, contextlib.suppress(OSError):
                        if not self._stopping:
                            sink.shutdown(socket.SHUT_WR)
                    break
                while moved:
                    try:
                        moved -= os.splice(pipe_out, sink_fd, moved, flags=_SPLICE_FLAGS)
                    except BlockingIOError:  # SO_SNDTIMEO: the receiver is slow
                        if self._stopping:
                            raise ConnectionAbortedError("tunnel stopped") from None
        except OSError as failure:
            error = failure
        finally:
            os.close(pipe_out)
            os.close(pipe_in)
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


async def splice_relay(loop: asyncio.AbstractEventLoop, client_fd: int, upstream: socket.socket) -> None:
    """Relay between the client (a socket owned by an asyncio transport, reading paused) and the
    upstream socket until both directions reach EOF or either fails; both are shut down on the way
    out (cancellation included)."""
    done: asyncio.Future[None] = loop.create_future()
    open_directions = [2]

    def finished(error: BaseException | None) -> None:  # on the event loop
        open_directions[0] -= 1
        if error is not None:
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
    for sock in (client, peer):  # the same open file descriptions as the caller's: see _SplicedTunnel
        os.set_blocking(sock.fileno(), True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL)
    tunnel = _SplicedTunnel(client, peer, finished_in_thread)
    try:
        tunnel.start()
        await done
    finally:
        tunnel.stop()
        # O_NONBLOCK belongs to the open file description the duplicates share with the transport's and
        # the caller's sockets: give them back non-blocking, so nothing on the event loop can block on
        # them afterwards (a thread still inside splice then gets EAGAIN and leaves, as it is stopping).
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
