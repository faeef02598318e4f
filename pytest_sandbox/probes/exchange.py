"""The one blocking read loop the network probes use on their side of a connection.

A probe sends an attempt and then reads what the proxy under test sends back until a stop condition
(a head, the expected responses), EOF, an error or a deadline; every ending is recorded, because "the
proxy closed", "the proxy went silent" and "the proxy reset" are different evidence. Lab sockets only.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from pytest_sandbox.http.framing import READ_SIZE
from pytest_sandbox.http.responses import ParsedResponse, parse_responses

# Past this many bytes the probe stops reading: what a proxy sent is evidence, not a download.
MAX_EXCHANGE_BYTES = 1024 * 1024


def _never() -> bool:
    return False


@dataclass
class SocketReader:
    """Reads ``sock`` into ``buffer`` until a condition, EOF, an error or ``deadline`` (monotonic)."""

    sock: socket.socket
    deadline: float
    buffer: bytearray
    limit: int = MAX_EXCHANGE_BYTES
    eof: bool = False
    timed_out: bool = False
    error: str = ""
    exception: BaseException | None = None  # the error that ended the read (reset, TLS torn down)

    def fill(self, until: Callable[[], bool] = _never, *, poll: float | None = None,
             idle: Callable[[], bool] = _never) -> None:
        """Read until ``until()``, EOF, error, ``limit`` bytes or the deadline.

        With ``poll``, ``idle()`` is asked every ``poll`` seconds while nothing arrives, and reading
        stops when it says so (it may watch something other than this socket, e.g. the bytes
        upstream; asking only while the peer is silent keeps a prompt peer cheap).
        """
        while not until() and not self.eof and len(self.buffer) < self.limit:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                if not self._already_arrived():
                    self.timed_out = True
                    return
                continue
            self.sock.settimeout(remaining if poll is None else min(remaining, poll))
            try:
                data = self.sock.recv(READ_SIZE)
            except TimeoutError:
                if poll is not None and time.monotonic() < self.deadline:
                    if idle():
                        return
                    continue
                self.timed_out = True
                return
            except (OSError, ssl.SSLError) as error:  # reset, or TLS torn down: the peer is gone
                self._gone(error)
                return
            if not data:
                self.eof = True
                return
            self.buffer += data

    def _gone(self, error: BaseException) -> None:
        """A reset, or TLS torn down: the peer is gone."""
        self.eof, self.exception = True, error
        self.error = f"{type(error).__name__}: {error}"

    def _already_arrived(self) -> bool:
        """Past the deadline: take, without waiting, what the socket already holds (bytes, EOF, a reset);
        False if nothing. A reader thread starved on a loaded machine (or a slow ``idle()``) can wake
        after the deadline with the answer or the close already received, and must not call that peer
        silent; what arrives later is still never read."""
        previous = self.sock.gettimeout()
        self.sock.settimeout(0.0)
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except (OSError, ssl.SSLError) as error:
            self._gone(error)
            return True
        finally:
            self.sock.settimeout(previous)
        if not data:
            self.eof = True
        self.buffer += data
        return True

    def responses(self) -> list[ParsedResponse]:
        """Every complete response read so far; bytes that are not HTTP/1.x set ``error``."""
        try:
            return parse_responses(bytes(self.buffer), eof=self.eof)[0]
        except ValueError as error:
            self.error = str(error)
            return []
