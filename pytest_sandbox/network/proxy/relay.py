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
from collections.abc import Callable

from pytest_sandbox.http.framing import READ_SIZE
from pytest_sandbox.network.proxy.watchdog import bounded

__all__ = ["RELAY_CHUNK", "SPLICE_AVAILABLE", "linger_close", "pump_both_ways", "splice_relay", "stream_buffered"]

RELAY_CHUNK = 256 * 1024
_LINGER_SECONDS = 2.0
_LINGER_MAX_BYTES = 1 << 20
# The server reads this through the module (``relay.SPLICE_AVAILABLE``) so a test can switch splice off.
SPLICE_AVAILABLE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_PIPE_SIZE = 1 << 20


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


class _SpliceDirection:
    """Moves bytes from one socket to another through a pipe with ``splice(2)``, on the event loop.

    Reads only while the pipe is empty, so a slow receiver pauses the sender (TCP backpressure);
    at EOF it half-closes the receiving side (``shutdown(SHUT_WR)``) so the tunnel stays half open
    like a real TCP connection.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, source: int, sink: int,
        half_close: Callable[[], None], finished: Callable[[BaseException | None], None],
    ) -> None:
        self._loop, self._source, self._sink = loop, source, sink
        self._half_close, self._finished = half_close, finished
        self._pipe_out, self._pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self._pipe_in, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        self._in_pipe = 0
        self._eof = False
        self._reading = self._writing = False
        self._done = False
        self._start_reading()

    def _start_reading(self) -> None:
        self._loop.add_reader(self._source, self._on_readable)
        self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._source)
            self._reading = False

    def _on_readable(self) -> None:
        # Drain the socket until it would block (or the receiver pushes back): one event-loop wakeup
        # then moves everything queued, instead of one splice pair per wakeup.
        while self._reading and not self._done:
            try:
                moved = os.splice(self._source, self._pipe_in, _PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as error:
                self._finish(error)
                return
            if moved == 0:
                self._eof = True
                self._stop_reading()
            self._in_pipe += moved
            self._flush()

    def _on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        while self._in_pipe:
            try:
                moved = os.splice(self._pipe_out, self._sink, self._in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                if not self._writing:
                    self._stop_reading()
                    self._loop.add_writer(self._sink, self._on_writable)
                    self._writing = True
                return
            except OSError as error:
                self._finish(error)
                return
            self._in_pipe -= moved
        if self._writing:
            self._loop.remove_writer(self._sink)
            self._writing = False
            if not self._eof:
                self._start_reading()
        if self._eof:
            with contextlib.suppress(OSError):
                self._half_close()
            self._finish(None)

    def _finish(self, error: BaseException | None) -> None:
        if not self._done:
            self._done = True
            self.close()
            self._finished(error)

    def close(self) -> None:
        self._stop_reading()
        if self._writing:
            self._loop.remove_writer(self._sink)
            self._writing = False
        for fd in (self._pipe_out, self._pipe_in):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pipe_out = self._pipe_in = -1


async def splice_relay(loop: asyncio.AbstractEventLoop, client_fd: int, upstream: socket.socket) -> None:
    """Relay between the client (a socket owned by an asyncio transport, reading paused) and the
    upstream socket until both directions reach EOF or either fails."""
    # The event loop refuses add_reader on a transport's own descriptor; a duplicate refers to the
    # same connection and is ours to register and close.
    client = socket.socket(fileno=os.dup(client_fd))
    done: asyncio.Future[None] = loop.create_future()
    open_directions = [2]

    def finished(error: BaseException | None) -> None:
        open_directions[0] -= 1
        if not done.done() and (error is not None or open_directions[0] == 0):
            done.set_result(None)

    directions: list[_SpliceDirection] = []
    try:
        upstream.setblocking(False)
        directions.append(_SpliceDirection(loop, client.fileno(), upstream.fileno(),
                                           lambda: upstream.shutdown(socket.SHUT_WR), finished))
        directions.append(_SpliceDirection(loop, upstream.fileno(), client.fileno(),
                                           lambda: client.shutdown(socket.SHUT_WR), finished))
        await done
    finally:
        for direction in directions:
            direction.close()
        client.close()


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
