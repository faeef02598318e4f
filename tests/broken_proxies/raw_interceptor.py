"""A deliberately broken ``inference.local`` interceptor: TLS in, every decrypted byte out, nothing checked.

It terminates the client's TLS with the interception CA and dials the backend exactly like the
reference :class:`~pytest_sandbox.inference.interceptor.InferenceInterceptor` (lab resolver, lab sockets,
verified upstream TLS), and adds the route's key after the first request line so that a lone
routed request works. Then it pipes bytes both ways: no framing, no routing, no second look at a
pipelined request. The tunnel-path twin of ``raw_relay.py``; detection tests run the smuggling
suite through it and it must earn no BLOCKED verdict.
"""

from __future__ import annotations

import asyncio
import contextlib

from pytest_sandbox.inference.interceptor import InferenceInterceptor, UpstreamError
from pytest_sandbox.inference.tls import TlsStream

READ_SIZE = 65536
IDLE_SECONDS = 5.0


class RawRelayInterceptor(InferenceInterceptor):
    """An interceptor whose only "policy" is the route key on the first request."""

    async def _serve(self, tls: TlsStream) -> None:
        try:
            _address, upstream_reader, upstream_writer = await self._dial_upstream()
        except UpstreamError:
            return
        key_line = f"Authorization: Bearer {self.backend.api_key}\r\n".encode()
        first = await _read(tls.reader)
        line_end = first.find(b"\n")
        if line_end != -1:
            first = first[:line_end + 1] + key_line + first[line_end + 1:]
        upstream_writer.write(first)
        copies = [asyncio.ensure_future(_copy(tls.reader, upstream_writer)),
                  asyncio.ensure_future(_copy(upstream_reader, tls.writer))]
        try:
            await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for copy in copies:
                copy.cancel()
            await asyncio.gather(*copies, return_exceptions=True)
            upstream_writer.close()


async def _read(reader: asyncio.StreamReader) -> bytes:
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        return await asyncio.wait_for(reader.read(READ_SIZE), IDLE_SECONDS)
    return b""


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await _read(reader):
        writer.write(data)
        with contextlib.suppress(OSError):
            await writer.drain()
