"""What the parser-mistake weak proxies share: a second reading of the request that the reference refuses.

``misread(request)`` is the one mistake: for a request the reference would refuse as malformed (or
judge by another host), it returns the authority a lenient parser reads and the path it sends. A
:class:`MisreadingProxy` then judges nothing about it and dials whatever that reading names, in
CONNECT (a tunnel) and in absolute-form (a forwarded GET); every other request is the reference's.
Used by ``ip_encoding_inet_aton.py``, ``unicode_late_normalised.py``, ``lenient_port.py`` and
``backslash_whatwg.py``. Only lab sockets are dialled, so a leak lands on a lab canary.
"""

from __future__ import annotations

from broken_proxies.weak_ssrf import WeakProxy
from pytest_sandbox.http.streams import Request
from pytest_sandbox.network.addresses import Authority
from pytest_sandbox.network.proxy.server import _Client, _Refused


class MisreadingProxy(WeakProxy):
    def misread(self, request: Request) -> tuple[Authority, str] | None:
        """(authority, upstream path) as the mistaken parser reads ``request``, or None: the reference's."""
        raise NotImplementedError

    async def _admit(self, request: Request) -> tuple[Authority, str, tuple[str, ...]]:
        misread = self.misread(request) if request.method != "CONNECT" else None
        if misread is None:
            return await super()._admit(request)
        authority, path = misread
        return authority, path, await self.unchecked_addresses(authority)

    async def _handle_connect(self, conn: _Client, request: Request) -> None:
        misread = self.misread(request)
        if misread is None:
            return await super()._handle_connect(conn, request)
        authority = misread[0]
        try:
            addresses = await self.unchecked_addresses(authority)
            upstream, address = await self._dial_socket(addresses, authority.port)
        except (_Refused, OSError) as error:
            refusal = error.refusal if isinstance(error, _Refused) else None
            if refusal is None:
                raise
            self._record_refusal(conn.name, request, authority, refusal)
            await self._refuse(conn, refusal)
            return
        self._record(conn.name, request, authority=authority, action="allow", status=200, reason="routed",
                     detail=f"tunnel to {address} port {authority.port} (misread, unchecked)", addresses=addresses)
        with upstream:
            await self._tunnel(conn, upstream)


def request_text(request: Request) -> str:
    """The request-target as the client wrote it (the reader decodes it as latin-1; clients send UTF-8)."""
    raw = request.target.encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return request.target


def split_url(target: str) -> tuple[str, str] | None:
    """(authority, path) of an ``http://`` URL, the scheme compared case-insensitively; None otherwise."""
    if not target[:7].lower() == "http://":
        return None
    rest = target[7:]
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    return rest[:end], rest[end:] or "/"
