"""A deliberately broken forward proxy: it relays every byte and checks nothing.

``python raw_relay.py --port PORT [--address ADDR] [--upstream HOST:PORT]``

Per client connection it reads the first request head only to choose where to dial:

* ``CONNECT host:port``: dial it, answer ``200 Connection established``, then pipe the bytes that
  followed the CONNECT head and everything after;
* an absolute-form target ``http://host[:port]/...``: dial that authority and send it **every byte
  as received** (the absolute-form request line included: RFC 9112 §3.2.2 says an origin must accept
  it);
* anything else: dial ``--upstream`` (a lab public origin by default) and send every byte.

Then it pipes both directions until either side closes. It never parses a Content-Length, a
Transfer-Encoding or a second request, so every smuggling payload reaches whatever it dialled. It
is only ever started inside the test lab's network namespace (``--sandbox-proxy-cmd``), where every
address it can dial is a lab listener. Standard library only: it runs under any interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import selectors
import socket
import threading
from typing import Any

HEAD_LIMIT = 65536
IDLE_SECONDS = 10.0
READ_SIZE = 65536
DIAL_SECONDS = 3.0
# userinfo is skipped, as urllib would: http://a@b/ dials b.
_ABSOLUTE = re.compile(rb"^[A-Za-z]+ http://(?:[^/@\s]*@)?(\[[^\]]+\]|[^/:@\s?#]+)(?::(\d+))?[/?\s]")
# A leading "//" (a network-path reference instead of host:port) is skipped, as a resolving parser would.
_CONNECT = re.compile(rb"^CONNECT (?://)?(\[[^\]]+\]|[^:\s]+):(\d+) ")


def destination(head: bytes, default: tuple[str, int]) -> tuple[str, int, bool]:
    """(host, port, is_connect) for the first request in ``head``."""
    match = _CONNECT.match(head)
    if match:
        return match.group(1).decode("latin-1").strip("[]"), int(match.group(2)), True
    match = _ABSOLUTE.match(head)
    if match:
        port = int(match.group(2)) if match.group(2) else 80
        return match.group(1).decode("latin-1").strip("[]"), port, False
    return default[0], default[1], False


async def lab_command_resolve(name: str) -> list[str]:
    """The C library's resolver, for a proxy run as a command inside a lab, where it asks the lab's DNS
    stub: the addresses of ``name`` in answer order, none when it does not resolve."""
    try:
        answers = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in answers))


def start_inner_reference() -> tuple[Any, tuple[str, int]]:
    """For a proxy run as a command inside a lab that puts a reference proxy behind it (``late_forwarder``,
    ``stalling``, ``late_dial_proxy``): the reference on a free loopback port, serving in a thread, resolving
    through the lab's DNS (:func:`lab_command_resolve`): (the reference proxy, its address)."""
    # Imported here: this file is also run on its own as the raw relay, which needs only the standard library.
    from pytest_sandbox.network.proxy.config import ProxyConfig
    from pytest_sandbox.network.proxy.server import EgressProxy
    from pytest_sandbox.network.route_lookup import local_route_socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    config = ProxyConfig(connect_timeout=2.0, upstream_timeout=2.0, resolve_timeout=2.0, idle_timeout=5.0)
    inner = EgressProxy(config, resolver=lab_command_resolve, socket_factory=lambda family: socket.socket(family),
                        route_socket_factory=local_route_socket)
    inner.start_in_thread(listener)
    return inner, listener.getsockname()


class LoopInThread:
    """A fake proxy's asyncio server (its ``_client(reader, writer)``) on a listening socket, run on a loop in a
    thread of its own; ``stop`` cancels every task of that loop (open connections, dials not made yet). For the
    proxies that put a reference proxy behind them (``stalling``, ``late_dial_proxy``): a dataclass with
    ``_loop`` and ``_thread`` fields (None until started)."""

    thread_name = "fake-proxy"
    _loop: asyncio.AbstractEventLoop | None
    _thread: threading.Thread | None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def serve(self, listen_sock: socket.socket) -> None:
        listen_sock.setblocking(False)
        server = await asyncio.start_server(self._client, sock=listen_sock, limit=HEAD_LIMIT)
        async with server:
            await server.serve_forever()

    def start_in_thread(self, listen_sock: socket.socket) -> None:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            task = self._loop.create_task(self.serve(listen_sock))
            self._loop.call_soon(ready.set)
            with contextlib.suppress(asyncio.CancelledError):
                self._loop.run_until_complete(task)

        self._thread = threading.Thread(target=main, name=self.thread_name, daemon=True)
        self._thread.start()
        ready.wait(5)

    def stop(self) -> None:
        """Stop serving: every task of the loop is cancelled (open connections closed, pending dials dropped)."""
        if self._loop is None or self._thread is None:
            return

        def cancel_all() -> None:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()

        self._loop.call_soon_threadsafe(cancel_all)
        self._thread.join(timeout=5)


async def relay_to_inner(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    inner_reader: asyncio.StreamReader,
    inner_writer: asyncio.StreamWriter,
    *,
    idle_seconds: float | None = None,
    sent: bytearray | None = None,
    answers: bytearray | None = None,
) -> None:
    """The relay of the proxies that put a reference proxy behind them (``late_forwarder``,
    ``late_dial_proxy``): the client's bytes to the inner proxy, its answers back unchanged, until the
    inner side closes, fails or is silent for ``idle_seconds`` (None: no limit); then both are closed.
    The client's bytes are appended to ``sent`` and the answers to ``answers``, for the caller's own
    mistake afterwards."""

    async def up() -> None:
        while data := await reader.read(READ_SIZE):
            if sent is not None:
                sent.extend(data)
            inner_writer.write(data)
            await inner_writer.drain()
        with contextlib.suppress(OSError):
            inner_writer.write_eof()  # the client's half-close, passed on

    pump = asyncio.create_task(up())
    try:
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            while data := await asyncio.wait_for(inner_reader.read(READ_SIZE), idle_seconds):
                if answers is not None:
                    answers.extend(data)
                writer.write(data)
                await writer.drain()
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await pump
        inner_writer.close()
        writer.close()


def pipe(client: socket.socket, upstream: socket.socket) -> None:
    """Copy bytes both ways until both directions ended or nothing moved for IDLE_SECONDS."""
    peers = {client: upstream, upstream: client}
    open_reads = {client, upstream}
    with selectors.DefaultSelector() as selector:
        for sock in open_reads:
            selector.register(sock, selectors.EVENT_READ)
        while open_reads:
            ready = selector.select(IDLE_SECONDS)
            if not ready:
                return
            for key, _events in ready:
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(READ_SIZE)
                except OSError:
                    data = b""
                if data:
                    with contextlib.suppress(OSError):
                        peers[sock].sendall(data)
                    continue
                selector.unregister(sock)
                open_reads.discard(sock)
                with contextlib.suppress(OSError):
                    peers[sock].shutdown(socket.SHUT_WR)


def serve_one(client: socket.socket, default: tuple[str, int]) -> None:
    with client:
        client.settimeout(IDLE_SECONDS)
        buffered = b""
        try:
            while b"\n" not in buffered and len(buffered) < HEAD_LIMIT:
                data = client.recv(READ_SIZE)
                if not data:
                    return
                buffered += data
            host, port, is_connect = destination(buffered, default)
            if is_connect:
                while b"\r\n\r\n" not in buffered and len(buffered) < HEAD_LIMIT:
                    data = client.recv(READ_SIZE)
                    if not data:
                        return
                    buffered += data
                buffered = buffered.partition(b"\r\n\r\n")[2]
            upstream = socket.create_connection((host, port), timeout=DIAL_SECONDS)
        except OSError:
            with contextlib.suppress(OSError):
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        with upstream:
            upstream.settimeout(None)
            client.settimeout(None)
            if is_connect:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if buffered:
                upstream.sendall(buffered)
            pipe(client, upstream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="11.0.0.10:80", help="where non-absolute requests go")
    args = parser.parse_args()
    up_host, _, up_port = args.upstream.rpartition(":")
    default = (up_host.strip("[]"), int(up_port))
    family = socket.AF_INET6 if ":" in args.address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((args.address, args.port))
        listener.listen(128)
        while True:
            client, _peer = listener.accept()
            threading.Thread(target=serve_one, args=(client, default), daemon=True).start()


if __name__ == "__main__":
    main()
