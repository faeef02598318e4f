"""The interceptor's TLS close lingers on every event loop the proxy runs on (inference/tls.py close_tls).

A refusal answered while the client is still writing must reach the client: the TCP connection is half-closed
(FIN) and what the client still sends is discarded for a moment, because closing a socket with unread bytes
sends a RST that can destroy the answer in flight (RFC 9112 §9.6). On uvloop the linger used to be skipped
(its transports are not ``asyncio.Transport`` subclasses), and the smuggling row tunnel-chunk-ext-64k came out
INDETERMINATE in loaded runs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import ssl
import threading
import time
from typing import Any

import pytest
import trustme

from pytest_sandbox.inference.tls import can_linger, close_tls, start_tls_server
from pytest_sandbox.network.proxy.server import run_on_loop

LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
    importlib.util.find_spec("uvloop") is None, reason="uvloop (the fast extra) is not installed"))]
ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
ANSWER = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
LATE_CHUNK = b"x" * 16384
LATE_CHUNKS = 8


@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_tcp_transport_of_each_loop_can_linger(loop_name: str) -> None:
    seen: list[bool] = []

    async def main() -> None:
        server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        seen.append(can_linger(writer.transport))
        writer.close()
        server.close()

    run_on_loop(main(), loop_name)
    assert seen == [True]


def test_a_transport_without_half_close_cannot_linger() -> None:
    class NoHalfClose:
        def get_protocol(self) -> None: ...
        def set_protocol(self, protocol: Any) -> None: ...
        def resume_reading(self) -> None: ...
        def can_write_eof(self) -> bool: return False

    assert not can_linger(NoHalfClose())  # type: ignore[arg-type]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_refusal_closed_while_the_client_writes_is_a_half_close_not_a_reset(loop_name: str) -> None:
    """The client reads the answer, then the EOF, then keeps writing: every late write must be accepted
    (discarded by the linger); a socket closed outright answers the first with a RST and the next fails."""
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("interceptor.test").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    served = threading.Event()
    errors: list[BaseException] = []

    async def serve() -> None:
        accepted = asyncio.get_running_loop().create_future()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(ESTABLISHED)  # as the proxy does: the client starts TLS only after this
                tls = await start_tls_server(reader, writer, server_context)
                await tls.reader.readexactly(4)  # the head of the request being refused
                tls.writer.write(ANSWER)
                await close_tls(tls)
            except BaseException as error:  # reported by the test, not lost in the loop
                errors.append(error)
            finally:
                accepted.set_result(None)

        server = await asyncio.start_server(on_client, sock=listener)
        served.set()
        await asyncio.wait_for(accepted, 30)
        server.close()

    thread = threading.Thread(target=run_on_loop, args=(serve(), loop_name), daemon=True)
    thread.start()
    assert served.wait(10)
    late_failures: list[str] = []
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert raw.recv(len(ESTABLISHED), socket.MSG_WAITALL) == ESTABLISHED
    with raw, client_context.wrap_socket(raw, server_hostname="interceptor.test") as client:
        client.sendall(b"POST")
        received = b""
        while True:
            chunk = client.recv(4096)
            if not chunk:
                break  # the proxy's FIN (no close_notify, as #819 closes)
            received += chunk
        # The TLS layer refuses to write after an EOF; the late bytes go on the TCP connection underneath
        # (the linger discards them unread either way).
        with socket.socket(fileno=os.dup(client.fileno())) as tcp:
            for _ in range(LATE_CHUNKS):
                try:
                    tcp.sendall(LATE_CHUNK)
                except OSError as error:
                    late_failures.append(f"{type(error).__name__}: {error}")
                    break
                time.sleep(0.02)
    thread.join(30)
    assert not errors, errors
    assert received == ANSWER
    assert late_failures == [], f"a late write was reset on {loop_name}: the close did not linger"
