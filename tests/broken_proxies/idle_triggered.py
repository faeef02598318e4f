"""A deliberately broken proxy that leaks only once the client has gone quiet.

``python idle_triggered.py --quiet-seconds Q [--per-connection] --host H --port P ...`` (the reference's
arguments otherwise).

While requests keep coming it is the reference proxy, exactly. A request that arrives when the previous one
(on any connection) arrived ``quiet_seconds`` or more earlier is dialled unchecked: its destination, a
special-use address included, is reached (in the lab: the catch-all canary). ``per_connection=True`` keys
the hole on connections instead: the first request on a connection opened after ``quiet_seconds`` of
silence goes through unchecked, whatever order the requests then arrive in. A suite that is one burst of
requests with pauses shorter than ``quiet_seconds`` credits it with BLOCKED everywhere; the after-quiet
exchanges (``probes/after_quiet.py``, sent when the lab has carried no TCP segment for as long as the suite
allows) must fail it, up to the threshold that quiet reaches.

In-process: :class:`IdleTriggeredProxy` (a subclass with the threshold set: :func:`idle_triggered`) with
:func:`broken_proxies.weak_ssrf.start_weak_proxy`. As a command inside a lab: :func:`command`
(``--sandbox-proxy-cmd``). It dials only through the lab's sockets (in-process) or inside the lab's
namespace (as a command), so whatever it leaks lands on a lab canary.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: use this checkout's package, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import contextvars
import time
from dataclasses import dataclass
from typing import Any

from broken_proxies.weak_ssrf import WeakProxy
from pytest_sandbox.http.streams import Request
from pytest_sandbox.network.addresses import Authority
from pytest_sandbox.network.third_party import main_reference, reference_command

DEFAULT_QUIET_SECONDS = 3.0


@dataclass
class _Connection:
    """Per client connection (a context variable of its serving task): was it opened after the quiet, and
    has its first request been taken."""

    opened_after_quiet: bool
    requests: int = 0


_CONNECTION: contextvars.ContextVar[_Connection | None] = contextvars.ContextVar("connection", default=None)
_UNCHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("unchecked", default=False)


class IdleTriggeredProxy(WeakProxy):
    """The reference proxy, except the request that ends ``quiet_seconds`` of silence (see the module)."""

    quiet_seconds = DEFAULT_QUIET_SECONDS
    per_connection = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_request: float | None = None  # silence is counted from a request: a fresh proxy is not quiet
        self.leaked: list[str] = []  # what went through unchecked, "METHOD target" (read by tests)

    def _quiet(self) -> bool:
        return self._last_request is not None and time.monotonic() - self._last_request >= self.quiet_seconds

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _CONNECTION.set(_Connection(opened_after_quiet=self._quiet()))  # this task serves the connection
        await super()._serve_client(reader, writer)

    def _arrived(self, request: Request) -> None:
        """Decide, for ``request`` just read, whether it goes through unchecked (the hole); it ends the silence."""
        connection = _CONNECTION.get()
        if self.per_connection:
            unchecked = connection is not None and connection.opened_after_quiet and connection.requests == 0
        else:
            unchecked = self._quiet()
        if connection is not None:
            connection.requests += 1
        self._last_request = time.monotonic()
        _UNCHECKED.set(unchecked)
        if unchecked:
            self.leaked.append(f"{request.method} {request.target}")

    async def _handle_forward(self, conn, request: Request) -> bool:  # type: ignore[no-untyped-def]
        self._arrived(request)
        return await super()._handle_forward(conn, request)

    async def _handle_connect(self, conn, request: Request) -> None:  # type: ignore[no-untyped-def]
        self._arrived(request)
        await super()._handle_connect(conn, request)

    async def _destination(self, authority: Authority) -> tuple[str, ...]:
        if _UNCHECKED.get():
            return await self.unchecked_addresses(authority)  # the hole: nobody was talking to it
        return await super()._destination(authority)


def idle_triggered(quiet_seconds: float, *, per_connection: bool = False) -> type[IdleTriggeredProxy]:
    """An :class:`IdleTriggeredProxy` class with its threshold (``start_weak_proxy`` takes a class)."""
    return type("IdleTriggeredProxy", (IdleTriggeredProxy,),
                {"quiet_seconds": quiet_seconds, "per_connection": per_connection})


def command(quiet_seconds: float, *, per_connection: bool = False) -> str:
    """The ``--sandbox-proxy-cmd`` that runs it in the lab with this threshold."""
    launcher = [sys.executable, str(Path(__file__).resolve()), "--quiet-seconds", str(quiet_seconds)]
    if per_connection:
        launcher.append("--per-connection")
    return reference_command(*launcher)


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quiet-seconds", type=float, default=DEFAULT_QUIET_SECONDS)
    parser.add_argument("--per-connection", action="store_true")
    options, rest = parser.parse_known_args(args)
    return main_reference(rest, idle_triggered(options.quiet_seconds, per_connection=options.per_connection))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
