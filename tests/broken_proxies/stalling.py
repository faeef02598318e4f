"""A deliberately broken proxy: silent to a request it has not seen before, then one of four behaviours.

``python stalling.py --port PORT [--address ADDR] [--variant VARIANT]`` (or ``STALLING_VARIANT=VARIANT``)

It accepts every connection and reads the request head. A request it has not seen before (its bytes with
every nonce taken out, so a campaign's first send of an exchange and its retry look the same, and each
exchange, form and unmarked twin is a request of its own) gets no answer at all: the connection stays
open until the client gives up. What a request it has seen before gets depends on ``VARIANT``:

* ``first-pass``: the reference proxy's answer (it relays to an inner reference
  :class:`~pytest_sandbox.network.proxy.server.EgressProxy`): denials refused with 403, controls forwarded.
  A proxy on a loaded machine looks like this; the retry must judge it on its answers.
* ``forever``: no answer either, ever.
* ``dial-on-retry``: it dials the destination itself (writing the request head for an absolute-form request,
  which carries the retry's nonce, nothing for a CONNECT), then gives the reference proxy's answer.
* ``late-first-dial``: it dials the destination of the *first* send, writing that send's head (its nonce),
  long after going silent to it, then gives the reference proxy's answer to the retry (a 403 for a denial).

A retry that judged only the second send's answer, or only its hits, credits ``dial-on-retry`` or
``late-first-dial`` with BLOCKED; the SSRF campaign must fail every denial they dial for
(``tests/test_ssrf_retry.py``).

In-process (:class:`StallingProxy`, lab sockets and the lab's resolver) or as a command inside a lab
(``--sandbox-proxy-cmd``): every address it can dial is a lab listener or the lab's catch-all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # run as a command: the tree under test
sys.path.insert(0, str(Path(__file__).resolve().parent))

from raw_relay import LoopInThread, destination, lab_command_resolve, relay_to_inner, start_inner_reference

VARIANTS = ("first-pass", "forever", "dial-on-retry", "late-first-dial")
HEAD_LIMIT = 64 * 1024
READ_SIZE = 65536
# How long a silent connection is held at most when the client never gives up.
STALL_SECONDS = 30.0
DIAL_SECONDS = 3.0
DEFAULT_UPSTREAM = ("11.0.0.10", 80)
# A nonce as the harness's requests carry it: ``sbx-`` and 16 hex digits, or an unmarked twin's UUID4
# (pytest_sandbox.network.lab.attribution spells both). Taken out, a first send and its retry are one request.
_NONCE = re.compile(rb"sbx-[0-9a-f]{16}|[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def request_identity(head: bytes) -> bytes:
    """``head`` with every nonce taken out: the same for every send of one exchange. Pure."""
    return _NONCE.sub(b"<nonce>", head)


@dataclass
class StallingProxy(LoopInThread):
    """The proxy. ``connect_inner`` opens a connection to the inner reference proxy, ``socket_factory(family)``
    makes the sockets its own dials use and ``resolve`` looks a name up (the lab's DNS)."""

    variant: str
    connect_inner: Callable[[], socket.socket]
    socket_factory: Callable[[int], socket.socket]
    resolve: Callable[[str], Awaitable[list[str]]]
    first_heads: dict[bytes, bytes] = field(default_factory=dict)  # identity -> the head of its first send
    silenced: int = 0  # requests it gave no answer
    dialled: list[tuple[str, int, bytes]] = field(default_factory=list)  # (address, port, bytes written)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    thread_name = "stalling-proxy"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}: one of {', '.join(VARIANTS)}")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        identity = request_identity(head)
        first = self.first_heads.get(identity)
        if first is None or self.variant == "forever":
            self.first_heads.setdefault(identity, head)
            await self._stall(reader, writer)
            return
        if self.variant == "dial-on-retry":
            await self._dial(head)
        elif self.variant == "late-first-dial":
            await self._dial(first)
        await self._relay(head, reader, writer)

    async def _stall(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Say nothing until the client gives up (or STALL_SECONDS pass)."""
        self.silenced += 1
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            while await asyncio.wait_for(reader.read(READ_SIZE), STALL_SECONDS):
                pass
        writer.close()

    async def _relay(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The inner reference proxy's answers to ``head`` and whatever follows it."""
        loop = asyncio.get_running_loop()
        try:
            inner = await loop.run_in_executor(None, self.connect_inner)
        except OSError:
            writer.close()
            return
        inner.setblocking(False)
        inner_reader, inner_writer = await asyncio.open_connection(sock=inner, limit=HEAD_LIMIT)
        inner_writer.write(head)
        await relay_to_inner(reader, writer, inner_reader, inner_writer)

    async def _dial(self, head: bytes) -> None:
        """Dial where ``head`` asks to go, as a proxy that checks nothing would: the head written for an
        absolute-form request, nothing for a CONNECT (its tunnel never opens)."""
        host, port, is_connect = destination(head, DEFAULT_UPSTREAM)
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            addresses = await self.resolve(host)
        if not addresses:
            return
        payload = b"" if is_connect else head
        family = socket.AF_INET6 if ":" in addresses[0] else socket.AF_INET
        loop = asyncio.get_running_loop()
        with self.socket_factory(family) as sock:
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (addresses[0], port)), DIAL_SECONDS)
                self.dialled.append((addresses[0], port, payload))
                if payload:
                    await loop.sock_sendall(sock, payload)
                    with contextlib.suppress(OSError, asyncio.TimeoutError):
                        await asyncio.wait_for(loop.sock_recv(sock, READ_SIZE), 1.0)
            except (OSError, asyncio.TimeoutError):
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--variant", choices=VARIANTS, default=os.environ.get("STALLING_VARIANT", "first-pass"))
    args = parser.parse_args()
    _inner, inner_address = start_inner_reference()
    proxy = StallingProxy(args.variant, lambda: socket.create_connection(inner_address, timeout=5),
                          lambda family: socket.socket(family), lab_command_resolve)
    family = socket.AF_INET6 if ":" in args.address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.address, args.port))
    listener.listen(128)
    threading.current_thread().name = "stalling-proxy"
    asyncio.run(proxy.serve(listener))


if __name__ == "__main__":
    main()
