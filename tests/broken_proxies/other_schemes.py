"""A weak proxy for the other-scheme family: its destination check lives in its ``http://`` path.

An absolute-form target with any other scheme (``https://``, ``ws://``, ``wss://``, ``ftp://``, ``sftp://``,
``ldap://``, ``gopher://``, ``dict://``, in any case) goes to a second path, as a proxy that originates TLS for
``https://`` URLs or hands other URLs to a URL library does, and that path dials the authority (the scheme's
default port when none is written) without any destination check. ``http://`` in any case is the reference, and
so is everything else. Every http:// case of the catalogue passed against it (the family predicate in
``tests/test_ssrf_detection.py`` selected nothing before the other-scheme cases).
"""

from __future__ import annotations

import dataclasses
import re

from broken_proxies.weak_ssrf import WeakProxy
from pytest_sandbox.http.streams import Request
from pytest_sandbox.network.addresses import Authority
from pytest_sandbox.network.proxy.decision import Refusal, split_target

# RFC 9110 §4.2.2 (https), RFC 6455 §3 (ws, wss), RFC 1738 §3.2 (ftp), RFC 4516 §2 (ldap), RFC 4266 (gopher),
# RFC 2229 §5 (dict), the sftp URI draft (22).
DEFAULT_PORTS = {"https": 443, "wss": 443, "ws": 80, "ftp": 21, "sftp": 22, "ldap": 389, "gopher": 70,
                 "dict": 2628}
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)


class OtherSchemeProxy(WeakProxy):
    async def _admit(self, request: Request) -> tuple[Authority, str, tuple[str, ...]]:
        match = _URL.fullmatch(request.target)
        scheme = match.group(1).lower() if match else "http"
        if scheme == "http" or match is None:
            return await super()._admit(request)
        authority_text = match.group(2)
        split = split_target(request.method, f"http://{authority_text}{match.group(3)}")
        if isinstance(split, Refusal):  # a target it cannot parse at all is still refused
            return await super()._admit(request)
        authority, path = split
        if not re.search(r":[0-9]+$", authority_text.rpartition("]")[2]):
            authority = dataclasses.replace(authority, port=DEFAULT_PORTS.get(scheme, 80))
        return authority, path, await self.unchecked_addresses(authority)  # the mistake: no destination check
