"""A correct proxy that keeps client connections open after answering: the speed target of issue #9.

The reference proxy, except that a forwarded answer never ends the client connection, even when the
request said ``Connection: close`` (the proxy simply waits for the client's next request, as many
production proxies do with their idle timeout). Refusals still answer and close, as the reference's
do. Its verdicts must be exactly the reference's; only a suite that waits for a close nobody needs
is slow against it (``benchmarks/bench_suite_vs_proxies.py`` measures that).

As a command inside a lab (``--sandbox-proxy-cmd``)::

    python3 tests/keepalive_proxy.py --host {address} --port {port} --allow-port 80 --allow-port 443
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a command: the tree under test

from pytest_sandbox.network.proxy.server import EgressProxy
from pytest_sandbox.network.third_party import main_reference, reference_command

SCRIPT = Path(__file__).resolve()


class KeepAliveProxy(EgressProxy):
    """Every forwarded answer keeps the client connection (refusals still close)."""

    async def _answer(self, conn: Any, request: Any, response: Any) -> bool:
        # The request as if it had not said "Connection: close" (HTTP/1.0 still closes).
        kept = [(name, value) for name, value in request.headers if name != "connection"]
        return await super()._answer(conn, replace(request, headers=tuple(kept)), response)


def keepalive_command(**options: Any) -> str:
    """The ``--sandbox-proxy-cmd`` that runs this proxy (``options`` as for ``reference_command``)."""
    return reference_command(sys.executable, str(SCRIPT), **options)


if __name__ == "__main__":
    raise SystemExit(main_reference(sys.argv[1:], KeepAliveProxy))
