"""A weak proxy for the origin-form request form: it routes ``GET /`` by its Host without the check.

Transparent-proxy style: an origin-form request (RFC 9112 §3.2.1) is sent to the Host it names. The
Host is canonicalised like the reference's targets (so malformed ones are still refused), but the
destination is never judged. Absolute-form, CONNECT, the bare authority and ``OPTIONS *`` are the
reference's. The issue saw 161 corpus payloads reach canaries through exactly this path.
"""

from __future__ import annotations

from broken_proxies.weak_ssrf import WeakProxy
from pytest_sandbox.http.streams import Request
from pytest_sandbox.network.addresses import Authority, MalformedTarget, parse_authority


class OriginFormUncheckedProxy(WeakProxy):
    async def _admit(self, request: Request) -> tuple[Authority, str, tuple[str, ...]]:
        host = request.header("host")
        if not request.target.startswith("/") or host is None:
            return await super()._admit(request)
        try:
            authority = parse_authority(host, default_port=80)
        except MalformedTarget:
            return await super()._admit(request)  # the reference's 400
        return authority, request.target, await self.unchecked_addresses(authority)
