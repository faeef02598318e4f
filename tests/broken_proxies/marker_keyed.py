"""A deliberately broken proxy that recognises the harness: it judges only requests that carry its marker.

Every request the conformance probes send carries the attempt's nonce in ``X-Sandbox-Probe`` (and, where
there is a path, in ``/sandbox-probe/<nonce>``). This proxy applies the reference's checks to exactly those
requests and dials anything else unchecked: a real client's ``GET http://169.254.169.254/`` goes through.
A suite whose every denial probe carries the marker credits it with BLOCKED everywhere; the unmarked
twin of each denial probe (``probes/ssrf_unmarked.py``) must fail it.

In-process: :class:`MarkerKeyedProxy` with :func:`broken_proxies.weak_ssrf.start_weak_proxy`. As a command
inside a lab: :data:`COMMAND` (``--sandbox-proxy-cmd``).
"""

from __future__ import annotations

import contextvars
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: use this checkout's package, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broken_proxies.weak_ssrf import WeakProxy
from pytest_sandbox.http.streams import Request
from pytest_sandbox.network.addresses import Authority
from pytest_sandbox.network.lab.attribution import NONCE_HEADER, NONCE_PATH_PREFIX
from pytest_sandbox.network.third_party import main_reference, reference_command

COMMAND = reference_command(sys.executable, str(Path(__file__).resolve()))

_UNMARKED: contextvars.ContextVar[bool] = contextvars.ContextVar("unmarked", default=False)


def carries_marker(request: Request) -> bool:
    """Whether ``request`` looks like the harness's: its nonce field or its nonce path."""
    return request.header(NONCE_HEADER) is not None or NONCE_PATH_PREFIX in request.target


class MarkerKeyedProxy(WeakProxy):
    async def _admit(self, request: Request) -> tuple[Authority, str, tuple[str, ...]]:
        _UNMARKED.set(not carries_marker(request))
        return await super()._admit(request)

    async def _handle_connect(self, conn, request: Request) -> None:  # type: ignore[no-untyped-def]
        _UNMARKED.set(not carries_marker(request))
        await super()._handle_connect(conn, request)

    async def _destination(self, authority: Authority) -> tuple[str, ...]:
        if _UNMARKED.get():
            return await self.unchecked_addresses(authority)  # the hole: nobody is looking
        return await super()._destination(authority)


if __name__ == "__main__":
    raise SystemExit(main_reference(sys.argv[1:], MarkerKeyedProxy))
