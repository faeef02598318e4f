"""A deliberately broken proxy: the reference proxy's refusals, then the refused bytes forwarded late.

``python late_forwarder.py --port PORT [--address ADDR] [--delay SECONDS]``

Per client connection it relays every byte to an inner reference
:class:`~pytest_sandbox.network.proxy.server.EgressProxy` and passes its answers back unchanged, so the client sees
genuine answers: positive controls work and every smuggling case gets the reference's refusal
(400/403/431/501) and a close. But it keeps every byte the client sent, and when an answer was a
refusal it closes the client connection and ``delay`` seconds later (200 ms) dials the first
request's authority itself (``raw_relay.destination``: a lab public origin, or the CONNECT
destination) and writes the client's bytes there, exactly as received. A judge that reads the
upstream record at once credits it with BLOCKED; the smuggling campaign must fail exactly the
cases it forwarded, and blame no positive control.

:class:`LateForwardingInterceptor` is the same inside the intercepted ``inference.local`` tunnel:
the reference interceptor's answers, then the decrypted bytes of a refused connection written to
the backend over a fresh TLS connection, after the client connection closed.

Only ever started inside the test lab's network namespace (``--sandbox-proxy-cmd``), or in-process
with the lab's sockets: every address it can dial is a lab listener.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import re
import socket
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # run as a command: the tree under test
sys.path.insert(0, str(Path(__file__).resolve().parent))

from raw_relay import destination, relay_to_inner, start_inner_reference

from pytest_sandbox.inference.interceptor import InferenceInterceptor, UpstreamError
from pytest_sandbox.inference.tls import TlsStream

DELAY_SECONDS = 0.2
READ_SIZE = 65536
IDLE_SECONDS = 5.0
DEFAULT_UPSTREAM = ("11.0.0.10", 80)
# Statuses of the reference proxy's refusals (RFC 9110 §15.5; 431 RFC 6585 §5; 501 for an unknown
# transfer coding, RFC 9112 §6.1; 505 for an HTTP version it does not speak, RFC 9110 §15.6.6).
REFUSALS = (b"400", b"403", b"413", b"431", b"501", b"505")


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def refused(answers: bytes) -> bool:
    """Whether any status line in ``answers`` is a refusal (found anywhere: a body need not end in CRLF)."""
    return any(match.group(1) in REFUSALS for match in _STATUS_LINE.finditer(answers))


class LateForwarder:
    """The relay. ``connect_inner`` opens a connection to the inner reference proxy."""

    def __init__(self, inner: tuple[str, int], *, delay: float = DELAY_SECONDS) -> None:
        self.inner = inner
        self.delay = delay
        self._pending: set[asyncio.Task[None]] = set()

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = bytearray()
        answers = bytearray()
        try:
            inner_reader, inner_writer = await asyncio.open_connection(*self.inner)
        except OSError:
            writer.close()
            return
        await relay_to_inner(reader, writer, inner_reader, inner_writer, idle_seconds=IDLE_SECONDS, sent=sent,
                             answers=answers)
        if sent and refused(bytes(answers)):
            task = asyncio.get_running_loop().create_task(self._forward_later(bytes(sent)))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _forward_later(self, sent: bytes) -> None:
        await asyncio.sleep(self.delay)
        host, port, is_connect = destination(sent, DEFAULT_UPSTREAM)
        payload = sent.partition(b"\r\n\r\n")[2] if is_connect else sent
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            upstream_reader, upstream_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3.0)
            upstream_writer.write(payload)
            await upstream_writer.drain()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(upstream_reader.read(READ_SIZE), 1.0)
            upstream_writer.close()


_REFUSED_ON_THIS_CONNECTION: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "refused_on_this_connection", default=None)


class LateForwardingInterceptor(InferenceInterceptor):
    """The reference interceptor's answers; after a refusal, the connection's decrypted bytes are
    written to the backend ``delay`` seconds after the client connection closed."""

    delay = DELAY_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: set[asyncio.Task[None]] = set()

    def _decide(self, reason: str, action: str, status: int, **facts: Any) -> None:
        refused = _REFUSED_ON_THIS_CONNECTION.get()
        if action == "deny" and refused is not None:
            refused.append(reason)
        super()._decide(reason, action, status, **facts)

    async def _serve(self, tls: TlsStream) -> None:
        sent = bytearray()
        tee = asyncio.StreamReader(limit=2 ** 20)

        async def copy() -> None:
            with contextlib.suppress(OSError):
                while data := await tls.reader.read(READ_SIZE):
                    sent.extend(data)
                    tee.feed_data(data)
            tee.feed_eof()

        pump = asyncio.create_task(copy())
        # Refusals are counted per connection (a context variable: tasks the serve starts inherit it), so
        # a refusal on a concurrent connection never makes this one's bytes forwarded late.
        refused: list[str] = []
        token = _REFUSED_ON_THIS_CONNECTION.set(refused)
        try:
            await super()._serve(TlsStream(tee, tls.writer, tls.raw_transport))
        finally:
            _REFUSED_ON_THIS_CONNECTION.reset(token)
            await asyncio.sleep(0)  # what the client already sent is in ``sent``
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        if refused and sent:
            task = asyncio.get_running_loop().create_task(self._forward_later(bytes(sent)))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _forward_later(self, sent: bytes) -> None:
        await asyncio.sleep(self.delay)
        try:
            _address, upstream_reader, upstream_writer = await self._dial_upstream()
        except UpstreamError:
            return
        key_line = f"Authorization: Bearer {self.backend.api_key}\r\n".encode()
        line_end = sent.find(b"\n")
        if line_end != -1:  # the route key after the first request line, as the raw interceptor does
            sent = sent[:line_end + 1] + key_line + sent[line_end + 1:]
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            upstream_writer.write(sent)
            await upstream_writer.drain()
            await asyncio.wait_for(upstream_reader.read(READ_SIZE), 1.0)
        upstream_writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=DELAY_SECONDS)
    args = parser.parse_args()
    _inner, inner_address = start_inner_reference()
    relay = LateForwarder(inner_address, delay=args.delay)
    family = socket.AF_INET6 if ":" in args.address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.address, args.port))
    listener.listen(128)

    async def serve() -> None:
        server = await asyncio.start_server(relay.client, sock=listener)
        async with server:
            await server.serve_forever()

    threading.current_thread().name = "late-forwarder"
    asyncio.run(serve())


if __name__ == "__main__":
    main()
