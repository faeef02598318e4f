"""A weak proxy for the dns-name family: it checks IP literals but trusts whatever a name resolves to.

``localtest.me``, ``169.254.169.254.nip.io``, ``metadata.google.internal``: the policy admits the
name, the resolver answers a special-use address, and this proxy dials it without classifying the
answer (network.md §3 says every answer is classified). Literals are judged as the reference does.
"""

from __future__ import annotations

from broken_proxies.weak_ssrf import WeakProxy
from pytest_sandbox.network.addresses import Authority
from pytest_sandbox.network.proxy.decision import Refusal, decide_destination


class NamesUncheckedProxy(WeakProxy):
    async def _destination(self, authority: Authority) -> tuple[str, ...]:
        if authority.ip is not None:
            return await super()._destination(authority)
        decided = decide_destination(authority, None, self._rules)  # port and host policy still apply
        if isinstance(decided, Refusal):
            return await super()._destination(authority)  # the reference's refusal
        return await self.unchecked_addresses(authority)  # the mistake: answers never classified
