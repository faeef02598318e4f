"""A weak proxy for the scheme-case family: its check is keyed on a lower-case ``http://``.

RFC 3986 §3.1 makes schemes case-insensitive, so ``GET HTTP://127.0.0.1/`` is an http request; this
proxy runs its destination check only when the target starts with ``http://`` and routes any other
spelling of the scheme straight to its host. Everything else is the reference proxy.
"""

from __future__ import annotations

from broken_proxies.weak_ssrf import WeakProxy
from pytest_sandbox.http.streams import Request
from pytest_sandbox.network.addresses import Authority
from pytest_sandbox.network.proxy.decision import Refusal, split_target


class SchemeCaseProxy(WeakProxy):
    async def _admit(self, request: Request) -> tuple[Authority, str, tuple[str, ...]]:
        target = request.target
        if target.startswith("http://") or not target.lower().startswith("http://"):
            return await super()._admit(request)
        split = split_target(request.method, "http://" + target[len("http://"):])
        if isinstance(split, Refusal):  # a target it cannot parse at all is still refused
            return await super()._admit(request)
        authority, path = split  # the mistake: no destination check on this spelling
        return authority, path, await self.unchecked_addresses(authority)
