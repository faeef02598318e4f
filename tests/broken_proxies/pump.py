"""What the two late-dialling broken proxies share: the client-to-inner relay loop, and the inner reference
proxy their command forms start (tests/broken_proxies/late_forwarder.py, tests/late_dial_proxy.py).

Both relay each client connection to an inner reference :class:`~pytest_sandbox.network.proxy.server.EgressProxy`,
pass its answers back unchanged and misbehave only after the connection closed. Only ever started inside
the test lab's network namespace (``--sandbox-proxy-cmd``) or in-process with the lab's sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from pytest_sandbox.network.proxy.config import ProxyConfig
from pytest_sandbox.network.proxy.server import EgressProxy
from pytest_sandbox.network.route_lookup import local_route_socket

READ_SIZE = 65536


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, keep: bytearray | None = None) -> None:
    """Copy ``reader`` to ``writer`` until the client's end of stream (every byte also into ``keep`` when
    given), then half-close ``writer``: the inner proxy sees the request end (a TCP FIN, RFC 9293 §3.6)
    and may still answer. A connection the inner proxy already closed ends the copy (OSError)."""
    while data := await reader.read(READ_SIZE):
        if keep is not None:
            keep.extend(data)
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


async def resolve_with_libc(name: str) -> list[str]:
    """The C library's resolver: inside a lab command it asks the lab's DNS stub."""
    try:
        answers = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in answers))


def start_inner_reference_proxy() -> tuple[EgressProxy, tuple[str, int]]:
    """The reference proxy on a loopback port of its own, served from a thread (the command forms: plain
    sockets are lab sockets there, names resolve through the lab's DNS). Returns it and its address."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    config = ProxyConfig(connect_timeout=2.0, upstream_timeout=2.0, resolve_timeout=2.0, idle_timeout=5.0)
    proxy = EgressProxy(config, resolver=resolve_with_libc, socket_factory=lambda family: socket.socket(family),
                        route_socket_factory=local_route_socket)
    proxy.start_in_thread(listener)
    return proxy, listener.getsockname()
