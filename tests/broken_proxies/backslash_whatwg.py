"""A weak proxy for the userinfo-backslash family: it judges urllib's host and dials the WHATWG host.

``GET http://169.254.169.254:80\\@public-origin.lab.test/``: ``urllib.parse`` treats the backslash
as an ordinary character and takes the host after the last ``@`` (``public-origin.lab.test``,
public: admitted); the WHATWG URL parser, as browsers and many HTTP clients read it, turns ``\\``
into ``/`` for special schemes, so the authority ends there and the dial goes to 169.254.169.254
(PayloadsAllTheThings' weak-parser payload ``http://127.1.1.1:80\\@127.2.2.2:80/``; Orange Tsai).
Where both readings name a special host (``allowed.example@127.0.0.1``, ``a\\@127.0.0.1``) the
check itself refuses. Reads with h11, which lets ``\\`` through the request line.
"""

from __future__ import annotations

import dataclasses
import urllib.parse

from broken_proxies.misread import MisreadingProxy
from broken_proxies.weak_ssrf import unchecked_authority
from pytest_sandbox.http.streams import Request
from pytest_sandbox.network.addresses import Authority


class BackslashWhatwgProxy(MisreadingProxy):
    strict_framing = False

    def misread(self, request: Request) -> tuple[Authority, str] | None:
        return None  # the dial is decided in _admit, after the check

    async def _admit(self, request: Request) -> tuple[Authority, str, tuple[str, ...]]:
        target = request.target
        if request.method == "CONNECT" or "\\" not in target or "://" not in target:
            return await super()._admit(request)
        judged = urllib.parse.urlsplit(target)  # backslash is data to urllib; host after the last '@'
        host = judged.netloc.rpartition("@")[2]
        # The check reads urllib's host, in the target and as the Host it would send upstream.
        await super()._admit(dataclasses.replace(request, target=f"http://{host}/", headers=(("host", host),)))
        dialled = urllib.parse.urlsplit(target.replace("\\", "/"))  # WHATWG: '\' is '/' for http
        authority = unchecked_authority(dialled.hostname or "", dialled.port)
        path = dialled.path or "/"
        return authority, path, await self.unchecked_addresses(authority)
