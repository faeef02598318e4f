"""The reference proxy with the self check it had before issue #8 item 7: a deliberately broken target.

That check compared the resolved address's *text* with the listening address, and for a wildcard
listener knew only 0.0.0.0, 127.0.0.1 and ::1. So ``[::ffff:11.0.0.20]:8080``, ``[::ffff:b00:14]:8080``
and a name whose AAAA is ``::ffff:11.0.0.20`` loop to a proxy listening on 11.0.0.20:8080, and a proxy
on 0.0.0.0 loops through every other local address. The self-connection cases must catch each of them.

Run as a third-party proxy: ``python tests/broken_self_check_proxy.py --host {address} --port {port}
--allow-port ...`` (:data:`COMMAND`), or in-process with :class:`TextSelfCheckProxy`.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: use this checkout's package, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_sandbox.network.proxy.server import EgressProxy
from pytest_sandbox.network.third_party import main_reference, reference_command

COMMAND = reference_command(sys.executable, str(Path(__file__).resolve()))


class TextSelfCheckProxy(EgressProxy):
    """EgressProxy whose self check is the pre-fix text comparison."""

    def _self_connection(self, address: str, port: int) -> str | None:
        listening = set(self.self_addresses())
        for host, listen_port in list(listening):
            if ipaddress.ip_address(host).is_unspecified:
                listening |= {("127.0.0.1", listen_port), ("::1", listen_port)}
        if (address, port) in listening:
            return f"{address} port {port} is this proxy (self connection)"
        return None


if __name__ == "__main__":
    raise SystemExit(main_reference(sys.argv[1:], proxy_class=TextSelfCheckProxy))
