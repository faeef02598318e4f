"""The proxy's upstream connections: one protocol per connection, one callback per response.

Each response is framed by :class:`pytest_sandbox.http.incremental.ResponseFramer` (pure; the one copy of
the upstream response framing rules, RFC 9112 §6.3), driven by ``data_received`` instead of awaited reads,
so an upstream response costs the event loop one callback, not a task wake-up per read (each wake-up is one
more pass of the loop: another epoll_wait and another trip through the scheduler, which is most of what a
keep-alive GET costs the proxy).

``UpstreamConnection`` is one connection to one checked (address, port). A response is delivered to the
``done`` callback given with its request; a coroutine awaits :meth:`UpstreamConnection.round_trip`.
Bytes an upstream sends while no request is outstanding, or its EOF, make the connection unusable: it is
never reused (a response nobody asked for means the connection's framing is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from pytest_sandbox.http.incremental import Response, ResponseFramer
from pytest_sandbox.http.streams import Reserve

__all__ = ["Outcome", "UpstreamConnection"]

Outcome = Response | BaseException


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection, dialled to the checked ``key`` (address, port); one request at a time.

    ``reserve`` (the proxy's memory budget) is charged before received bytes are kept; whatever it raises
    is delivered as the outcome, and so is any ``FramingViolation``, ``OSError`` or
    ``asyncio.IncompleteReadError`` (the upstream closed before its response was complete).
    """

    def __init__(self, key: tuple[str, int], *, max_body: int, reserve: Reserve | None) -> None:
        self.key = key
        self._max_body = max_body
        self._reserve = reserve
        self.transport: asyncio.Transport | None = None
        self._framer: ResponseFramer | None = None
        self._done: Callable[[Outcome], None] | None = None
        self.usable = True  # False once closed, or once it sent bytes nobody asked for

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, method: str, done: Callable[[Outcome], None]) -> None:
        """Write one request; ``done`` gets its response (or the failure) from the event loop."""
        transport = self.transport
        if transport is None or transport.is_closing():
            done(asyncio.IncompleteReadError(b"", None))
            return
        self._framer = ResponseFramer(method, max_body=self._max_body)
        self._done = done
        transport.write(data)

    async def round_trip(self, data: bytes, method: str) -> Response:
        """:meth:`send`, awaited."""
        answered: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        def done(outcome: Outcome) -> None:
            if answered.done():
                return
            if isinstance(outcome, BaseException):
                answered.set_exception(outcome)
            else:
                answered.set_result(outcome)

        self.send(data, method, done)
        return await answered

    def data_received(self, data: bytes) -> None:
        framer = self._framer
        if framer is None:  # a response to no request: this connection's framing is lost
            self.usable = False
            self.abort()
            return
        try:
            if self._reserve is not None:
                self._reserve(len(data))
            response = framer.feed(data)
        except Exception as error:  # FramingViolation, or the memory budget refusing the bytes
            self.usable = False
            self._deliver(error)
            return
        if response is not None:
            if not response.keep_alive:
                self.usable = False
            self._deliver(response)

    def eof_received(self) -> bool:
        self.usable = False
        framer = self._framer
        if framer is not None:
            try:
                outcome: Outcome = framer.eof()
            except asyncio.IncompleteReadError as error:
                outcome = error
            self._deliver(outcome)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self.transport = None
        if self._framer is not None:
            self._deliver(exc if exc is not None else asyncio.IncompleteReadError(b"", None))

    def _deliver(self, outcome: Outcome) -> None:
        done = self._done
        self._framer = self._done = None
        if done is not None:
            done(outcome)

    def close(self) -> None:
        self.usable = False
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.close()

    def abort(self) -> None:
        """Drop the connection now (a deadline passed): the pending request fails with the close."""
        self.usable = False
        transport: Any = self.transport
        if transport is not None:
            transport.abort()
