"""A weak proxy for the unicode family: it classifies the host as written, then dials it normalised.

``１２７.０.０.１``, ``127。0。0。1``, ``ⓛⓞⓒⓐⓛⓗⓞⓢⓣ``: the check sees a non-ASCII name that is no IP
literal and no special name, so it admits it; the dialler hands the host to Python's ``idna`` codec
(IDNA 2003 nameprep: NFKC, and U+3002/U+FF0E/U+FF61 as label separators, UTS 46 §4) as ``socket``
does, which gives ``127.0.0.1`` or ``localhost`` (Orange Tsai, "A New Era of SSRF"). Nothing checks
the normalised host. ASCII requests are the reference's.

Both request-line readers the project has (the strict one and h11) refuse non-ASCII bytes in a
request-target (RFC 9112 §3.2), so no mistake behind them can see these cases. This proxy's reader
takes UTF-8 in the request line, as many do: it percent-encodes the bytes >= 0x80 of the first line
before the reference reader sees it, and the mistake decodes them again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import urllib.parse

from broken_proxies.misread import MisreadingProxy, request_text, split_url
from pytest_sandbox.http.streams import Request
from pytest_sandbox.network.addresses import Authority


def _escape_non_ascii(line: bytes) -> bytes:
    return b"".join(b"%%%02X" % byte if byte >= 0x80 else bytes((byte,)) for byte in line)


class LateNormalisingProxy(MisreadingProxy):
    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readuntil(b"\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        reader._buffer[:0] = _escape_non_ascii(line)  # type: ignore[attr-defined]  # the lenient reader
        await super()._serve_client(reader, writer)

    def misread(self, request: Request) -> tuple[Authority, str] | None:
        target = urllib.parse.unquote(request_text(request))
        if target.isascii():
            return None
        split = (target, "") if request.method == "CONNECT" else split_url(target)
        if split is None:
            return None
        authority_text, path = split
        host, _, port = authority_text.rpartition(":") if ":" in authority_text else (authority_text, "", "80")
        if not port.isascii() or not port.isdigit():
            return None  # the port is judged as the reference does
        try:
            normalised = host.encode("idna").decode("ascii").lower()  # the mistake: after the check
        except UnicodeError:
            return None
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(normalised)
        except ValueError:
            ip = None
        return Authority(normalised, int(port), ip), path
