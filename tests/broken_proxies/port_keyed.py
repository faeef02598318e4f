"""A deliberately broken proxy that classifies a destination only on the ports the harness used to probe.

Every special-use denial of the SSRF catalogue was attempted on port 80, CONNECT included, where a real
HTTPS client sends ``CONNECT host:443``. This proxy is the reference everywhere except that on port 443 it
dials a special-use destination unclassified (the policy's host and port rules and the self-connection check
still stand): a client's ``CONNECT 169.254.169.254:443`` goes through. A proxy whose address check lives in
its plain-HTTP path, with HTTPS tunnels checked against the allowlist only, behaves this way. As a command
inside a lab: :data:`COMMAND` (``--sandbox-proxy-cmd``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: use this checkout's package, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broken_proxies.weak_ssrf import WeakProxy
from pytest_sandbox.network.addresses import Authority
from pytest_sandbox.network.proxy.server import _Refused
from pytest_sandbox.network.third_party import main_reference, reference_command

COMMAND = reference_command(sys.executable, str(Path(__file__).resolve()))
UNCLASSIFIED_PORT = 443


class HttpsPortUnclassifiedProxy(WeakProxy):
    async def _destination(self, authority: Authority) -> tuple[str, ...]:
        try:
            return await super()._destination(authority)
        except _Refused as refused:
            if (authority.port != UNCLASSIFIED_PORT or refused.refusal.reason != "ssrf_denied"
                    or "self connection" in refused.refusal.detail):
                raise
            return await self.unchecked_addresses(authority)  # the hole: a special-use address on 443


if __name__ == "__main__":
    raise SystemExit(main_reference(sys.argv[1:], HttpsPortUnclassifiedProxy))
