"""A weak proxy for the url-confusion family: it judges the text after the last ``@`` but dials the
RFC 3986 host (Orange Tsai, "A New Era of SSRF").

``GET http://169.254.169.254:80?@public-origin.lab.test/``: the check reads ``public-origin.lab.test``
(allowed), the dialler ends the authority at the first ``?`` (RFC 3986 §3.2, as ``urllib.parse``
does) and reaches 169.254.169.254. ``#@`` and ``#\\@`` reach it only past a request-line reader
that lets ``#`` and ``\\`` through, so this one reads with h11 (as most proxies do); everything else
is the reference proxy.
"""

from __future__ import annotations

import dataclasses
import urllib.parse

from broken_proxies.weak_ssrf import WeakProxy, unchecked_authority
from pytest_sandbox.http.streams import Request
from pytest_sandbox.network.addresses import Authority


class LastAtJudgeProxy(WeakProxy):
    strict_framing = False

    async def _admit(self, request: Request) -> tuple[Authority, str, tuple[str, ...]]:
        target = request.target
        if "://" not in target or "@" not in target:
            return await super()._admit(request)
        # The mistake: the check sees "http://" + whatever follows the last '@'...
        judged = dataclasses.replace(request, target="http://" + target.rsplit("@", 1)[1])
        await super()._admit(judged)
        # ...the dialler parses the URL as RFC 3986 / urllib does.
        parts = urllib.parse.urlsplit(target)
        authority = unchecked_authority(parts.hostname or "", parts.port)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return authority, path, await self.unchecked_addresses(authority)
