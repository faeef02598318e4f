"""A deliberately broken proxy: the reference proxy's answers, then a dial 200 ms after every 403.

It relays each client connection to an inner reference :class:`~pytest_sandbox.network.proxy.server.EgressProxy`
and passes its answers back unchanged, so every refusal the client sees is genuine. But whenever
the inner proxy refused a request with 403 for a destination it had already resolved, this relay
dials that destination itself ``delay`` seconds after the client connection closed: it sends the
request head for an absolute-form request (so the nonce reaches the canary) and nothing for a
CONNECT (a late dial with no bytes). A suite that reads the canaries at once, or blames a hit on
whatever test runs next, credits it with BLOCKED; the lab's campaign must fail exactly the cases it
leaked and blame no positive control.

In-process: :func:`start_late_dialer` (lab sockets, the lab's resolver). As a command inside a lab
(``--sandbox-proxy-cmd``): ``python3 tests/late_dial_proxy.py PORT``, where plain sockets are lab
sockets and names resolve through the lab's DNS (the command form binds the lab's resolv.conf).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a command: the tree under test

from broken_proxies.raw_relay import LoopInThread, relay_to_inner, start_inner_reference

from pytest_sandbox.network.lab.attribution import NONCE_HEADER
from pytest_sandbox.network.proxy.config import Decision

DELAY_SECONDS = 0.2
HEAD_LIMIT = 64 * 1024
RELAY_CHUNK = 65536


@dataclass(frozen=True)
class LateDial:
    """One destination dialled after its 403: what the relay leaked, by the request's nonce."""

    nonce: str | None
    target: str
    address: str
    port: int


def _literal(authority: str) -> tuple[str, int] | None:
    """``11.0.0.10:22`` / ``[2600:9000::10]:80`` -> (address, port); None for a name or a bad port."""
    host, _, port = authority.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        return None


def _status_of(answers: bytes) -> bytes:
    """The status code of the first answer (``b""`` when there was none)."""
    parts = answers.split(b" ", 2)
    return parts[1] if len(parts) > 1 else b""


def _nonce_of(head: bytes) -> str | None:
    wanted = NONCE_HEADER.lower().encode() + b":"
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(wanted):
            return line.split(b":", 1)[1].strip().decode("latin-1")
    return None


@dataclass
class LateDialer(LoopInThread):
    """The relay. ``connect_inner`` opens a connection to the inner proxy; ``socket_factory(family)``
    makes the sockets the late dials use; ``decisions`` is the inner proxy's decision log."""

    connect_inner: Callable[[], socket.socket]
    socket_factory: Callable[[int], socket.socket]
    decisions: Callable[[], list[Decision]]
    delay: float = DELAY_SECONDS
    # Also dial a refused CONNECT to an address literal the inner proxy never resolved (refused by its port):
    # the allowlist category's late dial (``--literals`` on the command line).
    dial_refused_literals: bool = False
    # A dialer whose lateness drifts (what a loaded machine does to any proxy): every dial of a target after
    # its first comes ``slowdown`` seconds later than ``delay``.
    slowdown: float = 0.0
    # A dialer that leaks only sometimes: these request targets are dialled the first time only.
    once: frozenset[str] = frozenset()
    dialled: list[LateDial] = field(default_factory=list)
    _seen: dict[str, int] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    thread_name = "late-dialer"
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        request_line = head.split(b"\r\n", 1)[0].decode("utf-8", "surrogateescape")
        method, _, rest = request_line.partition(" ")
        target = rest.rsplit(" ", 1)[0]
        inner = await loop.run_in_executor(None, self.connect_inner)
        inner.setblocking(False)
        inner_reader, inner_writer = await asyncio.open_connection(sock=inner, limit=HEAD_LIMIT)
        inner_writer.write(head)
        answers = bytearray()
        await relay_to_inner(reader, writer, inner_reader, inner_writer, answers=answers)
        if _status_of(answers) == b"403":
            decision = self._decision_for(target)
            places: list[tuple[str, int]] = []
            if decision is not None and decision.addresses and decision.port is not None:
                places = [(address, decision.port) for address in decision.addresses]
            elif self.dial_refused_literals and method == "CONNECT" and (literal := _literal(target)) is not None:
                places = [literal]  # refused before any resolution (a port outside the allowlist)
            payload = b"" if method == "CONNECT" else head
            seen = self._seen.get(target, 0)
            self._seen[target] = seen + 1
            if seen and target in self.once:
                return
            delay = self.delay + (self.slowdown if seen else 0.0)
            for address, port in places:
                loop.call_later(delay, self._start_dial, LateDial(_nonce_of(head), target, address, port), payload)

    def _decision_for(self, target: str) -> Decision | None:
        return next((d for d in reversed(self.decisions()) if d.target == target and d.status == 403), None)

    def _start_dial(self, dial: LateDial, payload: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._dial(dial, payload))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _dial(self, dial: LateDial, payload: bytes) -> None:
        family = socket.AF_INET6 if ":" in dial.address else socket.AF_INET
        loop = asyncio.get_running_loop()
        with self.socket_factory(family) as sock:
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (dial.address, dial.port))
                self.dialled.append(dial)
                if payload:
                    await loop.sock_sendall(sock, payload)
                    with contextlib.suppress(OSError):
                        await asyncio.wait_for(loop.sock_recv(sock, RELAY_CHUNK), 1.0)
            except (OSError, asyncio.TimeoutError):
                return


# --------------------------------------------------------------------------------------------------
# As a command inside a lab: python3 tests/late_dial_proxy.py PORT [--literals] [--delay SECONDS]
# --------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    literals = "--literals" in argv
    argv = [arg for arg in argv if arg != "--literals"]
    delay = DELAY_SECONDS
    if len(argv) == 3 and argv[1] == "--delay":  # seconds after the client closed
        delay = float(argv.pop())
        argv.pop()
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: late_dial_proxy.py PORT [--literals] [--delay SECONDS]", file=sys.stderr)
        return 2
    inner, inner_address = start_inner_reference()
    relay = LateDialer(lambda: socket.create_connection(inner_address, timeout=5), lambda family: socket.socket(family),
                       lambda: inner.decisions, delay=delay, dial_refused_literals=literals)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(argv[0])))
    listener.listen(128)
    asyncio.run(relay.serve(listener))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
