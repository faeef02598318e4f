"""A deliberately broken proxy that leaks exactly one smuggling row, on both paths, and serves the rest right.

It exists to prove that the smuggling campaign's concurrency mixes no evidence: while the other
rows run alongside it, the leaked row must fail, on both paths, and every other row must keep the
reference's verdict (a leak credited to a neighbour, or hidden by one, would show as a wrong verdict
on some other row).

* :class:`OneRowLeakFront`: a front relay on its own lab port. It reads what arrives first on each
  client connection (the harness writes a payload in one go); when it holds ``marker`` it dials
  the request's authority itself (``raw_relay.destination``, a lab public origin) and relays
  every byte both ways, checking nothing; any other connection (``CONNECT inference.local:443``
  included) is relayed byte for byte to the inner reference proxy.
* :class:`OneRowLeakInterceptor`: the reference ``inference.local`` interceptor, except that a
  tunnel whose first decrypted bytes hold ``marker`` is relayed raw to the backend
  (:class:`~broken_proxies.raw_interceptor.RawRelayInterceptor`).

In-process, with the lab's sockets only: every address it can dial is a lab listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading

from broken_proxies.raw_interceptor import RawRelayInterceptor
from broken_proxies.raw_relay import destination, pipe
from pytest_sandbox.inference.interceptor import InferenceInterceptor
from pytest_sandbox.inference.tls import TlsStream
from pytest_sandbox.network.lab.lab import NetworkLab

READ_SIZE = 65536
IDLE_SECONDS = 5.0


class OneRowLeakInterceptor(RawRelayInterceptor):
    """The reference interceptor, but a tunnel whose first request head holds ``marker`` is relayed raw."""

    def __init__(self, *args: object, marker: bytes, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.marker = marker

    def leaks(self) -> bool:
        """Whether this marked connection is leaked (always, here; subclasses leak less)."""
        return True

    def rewrite(self, first: bytes) -> bytes:
        """The leaked bytes as forwarded (unchanged, here)."""
        return first

    async def _serve(self, tls: TlsStream) -> None:
        first = b""
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            first = await asyncio.wait_for(tls.reader.read(READ_SIZE), IDLE_SECONDS)
        # The bytes read are given back in order, ahead of whatever the client sends next.
        leaked = self.marker in first and self.leaks()
        replay = asyncio.StreamReader()
        replay.feed_data(self.rewrite(first) if leaked else first)
        copier = asyncio.ensure_future(_copy_into(tls.reader, replay))
        stream = dataclasses.replace(tls, reader=replay)
        try:
            if leaked:
                await RawRelayInterceptor._serve(self, stream)
            else:
                await InferenceInterceptor._serve(self, stream)
        finally:
            copier.cancel()
            await asyncio.gather(copier, return_exceptions=True)


async def _copy_into(source: asyncio.StreamReader, sink: asyncio.StreamReader) -> None:
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        while data := await source.read(READ_SIZE):
            sink.feed_data(data)
    sink.feed_eof()


class OneRowLeakFront:
    """The front relay on ``address``:``port`` in ``lab``, in a thread per connection (see the module doc)."""

    def __init__(self, lab: NetworkLab, address: str, port: int, inner: tuple[str, int], *, marker: bytes,
                 default: tuple[str, int]) -> None:
        self.lab, self.address, self.port = lab, address, port
        self.inner, self.marker, self.default = inner, marker, default
        self._listener = lab.listen(address, port)
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="one-row-leak", daemon=True)
        self._acceptor.start()

    def leaks(self) -> bool:
        """Whether this marked connection is leaked (always, here; subclasses leak less)."""
        return True

    def rewrite(self, first: bytes) -> bytes:
        """The leaked bytes as forwarded (unchanged, here)."""
        return first

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A client connection to the front, from inside the lab."""
        return self.lab.connect(self.address, self.port, timeout=timeout)

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(IDLE_SECONDS)
        for thread in self._threads:
            thread.join(IDLE_SECONDS * 2)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _peer = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            client.settimeout(IDLE_SECONDS)
            try:
                first = client.recv(READ_SIZE)
                if not first:
                    return
                if self.marker in first and self.leaks():
                    host, port, _is_connect = destination(first, self.default)
                    upstream = self.lab.dial(host, port, IDLE_SECONDS)
                    first = self.rewrite(first)
                else:
                    upstream = self.lab.connect(*self.inner, timeout=IDLE_SECONDS)
            except OSError:
                return
            with upstream:
                upstream.settimeout(None)
                client.settimeout(None)
                with contextlib.suppress(OSError):
                    upstream.sendall(first)
                    pipe(client, upstream)
