"""The CONNECT relay's threads (pytest_sandbox.network.proxy.relay): a tunnel moves bytes without waking the
event loop per chunk, resumes exactly where a send cut short by its timeout stopped, and stopping the proxy
ends every tunnel on both sides and its threads.

No wall-clock assertion: the event loop's iterations are counted, and the stream-copy relay (which does
wake the loop per chunk) is the positive control that the count can see per-chunk work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from test_proxy import IO_TIMEOUT, Lab, RawClient
from test_proxy import lab as proxy_lab  # noqa: F401 - the fixture ``lab``: a fake network on loopback

from pytest_sandbox.network.proxy import relay
from pytest_sandbox.network.proxy.config import ProxyConfig
from pytest_sandbox.network.proxy.server import LOOP_ENVIRONMENT_VARIABLE

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
BULK = bytes(range(256)) * 4096 * 8  # 8 MiB


@pytest.fixture
def lab(proxy_lab: Lab) -> Lab:  # noqa: F811 - the imported fixture, by its own name
    return proxy_lab


def settle(condition: Callable[[], bool], seconds: float = IO_TIMEOUT) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def tunnel_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("tunnel-")}


def open_tunnel(proxy: Any) -> RawClient:
    client = RawClient(proxy)
    client.send(b"CONNECT echo.test:443 HTTP/1.1\r\nHost: echo.test:443\r\n\r\n")
    assert client.read_raw(len(ESTABLISHED)) == ESTABLISHED
    return client


def echo_through(client: RawClient, blob: bytes) -> bytes:
    sender = threading.Thread(target=client.send, args=(blob,))
    sender.start()
    echoed = client.read_raw(len(blob))
    sender.join(IO_TIMEOUT)
    return echoed


def loop_iterations_during(monkeypatch: pytest.MonkeyPatch, lab: Lab, threads: bool) -> int:
    """How many times the proxy's event loop ran an iteration while 8 MiB went both ways through a tunnel."""
    monkeypatch.setattr(relay, "THREAD_RELAY", threads)
    monkeypatch.setenv(LOOP_ENVIRONMENT_VARIABLE, "asyncio")  # the counter hooks the stdlib loop (uvloop: blind)
    counted = [0]
    counting = threading.Event()
    real_run_once = asyncio.base_events.BaseEventLoop._run_once  # type: ignore[attr-defined]

    def run_once(self: asyncio.AbstractEventLoop) -> None:
        if counting.is_set() and threading.current_thread().name == "egress-proxy":
            counted[0] += 1
        real_run_once(self)

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "_run_once", run_once)
    proxy = lab.start_proxy()
    client = open_tunnel(proxy)
    assert echo_through(client, b"warm") == b"warm"
    counting.set()
    echoed = echo_through(client, BULK)
    counting.clear()
    client.close()
    assert echoed == BULK
    return counted[0]


def test_a_threaded_tunnel_moves_bulk_bytes_without_waking_the_event_loop(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    woken = loop_iterations_during(monkeypatch, lab, threads=True)
    assert woken <= 4, f"the threaded tunnel woke the event loop {woken} times for 16 MiB of relay"


def test_the_loop_iteration_count_sees_a_relay_that_works_per_chunk(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Positive control: the stream-copy relay runs on the event loop, chunk by chunk, and is counted."""
    copied = loop_iterations_during(monkeypatch, lab, threads=False)
    assert copied > 20, f"the stream-copy relay ran only {copied} loop iterations: the counter is blind"


def test_stopping_the_proxy_ends_open_tunnels_on_both_sides_and_their_threads(lab: Lab) -> None:
    before = tunnel_threads()
    proxy = lab.start_proxy()
    clients = [open_tunnel(proxy) for _ in range(3)]
    for client in clients:
        assert echo_through(client, b"ping") == b"ping"  # positive control: the tunnels are open
    assert settle(lambda: len(tunnel_threads() - before) == 6), tunnel_threads()
    proxy.stop()
    for client in clients:
        _assert_closed_then_close(client, "the client side of a tunnel stayed open after the proxy stopped")
    assert settle(lambda: not tunnel_threads() - before), f"tunnel threads left: {tunnel_threads()}"


def test_an_upstream_reset_closes_the_client_side_and_ends_both_threads(lab: Lab) -> None:
    before = tunnel_threads()
    client, upstream = _tunnel_to_own_upstream(lab, socket.create_server(("127.0.0.1", 0)))
    client.send(b"hello")
    assert upstream.recv(5) == b"hello"  # positive control: the tunnel carries bytes upstream
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    upstream.close()  # a TCP RST
    _assert_closed_then_close(client, "the client side stayed open after the upstream reset")
    assert settle(lambda: not tunnel_threads() - before), f"tunnel threads left: {tunnel_threads()}"


def test_a_tunnel_that_cannot_be_set_up_closes_its_duplicates_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay sets its duplicates up (blocking, SO_RCVTIMEO/SO_SNDTIMEO) before any thread owns them. If that
    fails, it must close them itself: left to the traceback, they live as long as whoever keeps the exception
    (found with a proxy process that raised there: the client waited, its connection held open by a duplicate
    after the proxy had closed its own descriptor). Here the test keeps the exception."""
    monkeypatch.setattr(relay, "_TIMEVAL", b"not a timeval")  # setsockopt(2) fails with EINVAL
    client_side, proxy_side = socket.socketpair()
    upstream_side, upstream = socket.socketpair()
    with client_side, proxy_side, upstream_side, upstream:
        for sock in (proxy_side, upstream):
            sock.setblocking(False)  # as the event loop keeps them
        descriptors = len(os.listdir("/proc/self/fd"))

        async def set_up() -> OSError:
            try:
                await relay.thread_relay(asyncio.get_running_loop(), proxy_side.fileno(), upstream)
            except OSError as error:
                return error
            raise AssertionError("the tunnel started although setsockopt(2) failed")

        kept = asyncio.run(set_up())
        assert kept.errno == errno.EINVAL, kept
        assert len(os.listdir("/proc/self/fd")) == descriptors, "the duplicates outlived the failed set-up"
        assert not os.get_blocking(proxy_side.fileno()) and not os.get_blocking(upstream.fileno()), \
            "the caller's sockets were left blocking"
        proxy_side.close()
        client_side.settimeout(IO_TIMEOUT)
        assert client_side.recv(1) == b"", "the client's connection is still held open"


def test_a_tunnel_holds_small_buffers_until_a_direction_carries_bulk(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each direction starts with a 64 KiB buffer and takes the 1 MiB one only after a read filled what it had:
    idle and interactive tunnels hold 128 KiB of buffers, bulk ones read whole socket queues."""
    buffers: dict[str, set[int]] = {}
    real_recv_into = socket.socket.recv_into

    def recv_into(self: socket.socket, buffer: Any, *args: int) -> int:
        name = threading.current_thread().name
        if name.startswith("tunnel-"):
            buffers.setdefault(name, set()).add(len(buffer))
        return real_recv_into(self, buffer, *args)

    monkeypatch.setattr(socket.socket, "recv_into", recv_into)
    proxy = lab.start_proxy()
    client = open_tunnel(proxy)
    for message in (b"ping", b"x" * 1000, b"pong"):
        assert echo_through(client, message) == message  # positive control: the tunnel carries bytes
    assert buffers == {"tunnel-up": {64 * 1024}, "tunnel-down": {64 * 1024}}, buffers
    assert echo_through(client, BULK) == BULK
    client.close()
    assert buffers == {"tunnel-up": {64 * 1024, 1 << 20}, "tunnel-down": {64 * 1024, 1 << 20}}, \
        f"8 MiB each way and a direction did not take the 1 MiB buffer: {buffers}"


def test_a_receiver_slower_than_the_send_timeout_gets_every_byte_once(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a 1 ms SO_SNDTIMEO and an upstream that reads slowly through a small window, the relay's sends are
    cut short (a send that moved some bytes returns their count) or time out having moved none; each time the
    tunnel has to go on from the first byte not yet sent. Random bytes, so a repeated or skipped piece shows."""
    monkeypatch.setattr(relay, "_TIMEVAL", struct.pack("ll", 0, 1000))
    upload_sends: list[str] = []
    real_send = socket.socket.send

    def send(self: socket.socket, data: Any, *flags: int) -> int:
        if threading.current_thread().name != "tunnel-up":
            return real_send(self, data, *flags)
        try:
            sent = real_send(self, data, *flags)
        except BlockingIOError:
            upload_sends.append("timed out")
            raise
        upload_sends.append("cut short" if sent < len(data) else "whole")
        return sent

    monkeypatch.setattr(socket.socket, "send", send)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # inherited by the accepted socket
    client, upstream = _tunnel_to_own_upstream(lab, listener)
    blob = random.Random(12).randbytes(8 * 2**20)  # more than a send buffer holds (tcp_wmem max 4 MiB)

    def upload() -> None:
        client.send(blob)
        client.sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=upload)
    sender.start()
    received = bytearray()
    while chunk := upstream.recv(16384):
        received += chunk
        time.sleep(0.001)
    sender.join(IO_TIMEOUT)
    upstream.close()
    client.close()
    assert upload_sends.count("cut short") + upload_sends.count("timed out") > 0, \
        f"no send was cut short, so nothing here exercised a resume: {set(upload_sends)}"
    assert len(received) == len(blob) and received == blob, "the tunnel lost, repeated or reordered bytes"


def _tunnel_to_own_upstream(lab: Lab, listener: socket.socket) -> tuple[RawClient, socket.socket]:
    """A proxy with port 8443 allowed, a CONNECT through it to echo.test:8443 routed to ``listener``:
    (the client side, the accepted upstream side). ``listener`` is closed once it accepted."""
    lab.network.table[("93.184.215.20", 8443)] = listener.getsockname()[1]
    defaults = ProxyConfig()
    proxy = lab.start_proxy(dataclasses.replace(defaults, allowed_ports=(*defaults.allowed_ports, 8443)))
    client = RawClient(proxy)
    client.send(b"CONNECT echo.test:8443 HTTP/1.1\r\nHost: echo.test:8443\r\n\r\n")
    assert client.read_raw(len(ESTABLISHED)) == ESTABLISHED
    listener.settimeout(IO_TIMEOUT)
    with listener:
        upstream, _ = listener.accept()
    upstream.settimeout(IO_TIMEOUT)
    return client, upstream


def _assert_closed_then_close(client, message: str) -> None:
    """The proxy ended ``client``'s connection: end of stream (or a reset) within IO_TIMEOUT; then close it."""
    client.sock.settimeout(IO_TIMEOUT)
    try:
        rest = client.sock.recv(1)
    except ConnectionResetError:
        rest = b""
    assert rest == b"", message
    client.close()
