"""Blocking socket reads the tests share: a peer's bytes up to the end of an HTTP head.

The head of an HTTP/1.1 message ends at the first empty line, CRLF CRLF (RFC 9112 §2.1). Tests read up
to it to see a status line or a request line, bounded in bytes and in time, so a peer that never ends
its head fails the test instead of holding it.
"""

from __future__ import annotations

import socket
import time

HEAD_END = b"\r\n\r\n"
HEAD_LIMIT = 64 * 1024
HEAD_SECONDS = 10.0
READ_SIZE = 65536


def read_head(sock: socket.socket, *, limit: int = HEAD_LIMIT, seconds: float = HEAD_SECONDS) -> bytes:
    """The bytes ``sock`` delivers until they hold the end of a head (what followed it in the same
    reads included), the peer closes, or more than ``limit`` bytes came without it: the caller tells
    these apart by looking for :data:`HEAD_END`. Raises ``TimeoutError`` when ``seconds`` pass first.

    Works on a TLS socket too. The socket's own timeout still bounds each read and is restored."""
    deadline = time.monotonic() + seconds
    previous = sock.gettimeout()
    data = b""
    try:
        while HEAD_END not in data and len(data) <= limit:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no end of head within {seconds} s; received {data[:200]!r}")
            sock.settimeout(min(left, previous) if previous else left)
            try:
                chunk = sock.recv(READ_SIZE)
            except TimeoutError as silent:  # socket.timeout is TimeoutError (3.10+)
                raise TimeoutError(f"no end of head in time; received {data[:200]!r}") from silent
            if not chunk:
                break
            data += chunk
    finally:
        sock.settimeout(previous)
    return data
