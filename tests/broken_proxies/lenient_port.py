"""A weak proxy for the port family: it reads the port as C's strtoul into a 16-bit port does.

RFC 9110 §4.2 / RFC 3986 §3.2.3 ports are ASCII digits only; this reader takes the text after the
last ``:``, skips leading whitespace, a sign and zeros, reads any Unicode decimal digits (as
Python's ``int`` does), stops at the first non-digit (``+80aaa`` -> 80), wraps a negative number
and keeps the low 16 bits (``65616`` -> 80, ``65536`` -> 0), and an empty port is 80. The host is
still the reference's. The port it read is what it checks and dials, so every mangled port reaches
its host.
"""

from __future__ import annotations

import re

from broken_proxies.misread import MisreadingProxy, request_text, split_url
from pytest_sandbox.http.streams import Request
from pytest_sandbox.network.addresses import Authority, MalformedTarget, parse_authority

_STRTOUL = re.compile(r"\s*([+-]?)(\d*)")


def lenient_port(text: str) -> int:
    sign, digits = _STRTOUL.match(text).groups()  # type: ignore[union-attr]
    value = int(digits) if digits else (0 if text.strip() else 80)
    return (-value if sign == "-" else value) & 0xFFFF


class LenientPortProxy(MisreadingProxy):
    def misread(self, request: Request) -> tuple[Authority, str] | None:
        target = request_text(request)
        split = (target, "") if request.method == "CONNECT" else split_url(target)
        if split is None or ":" not in split[0]:
            return None
        authority_text, path = split
        try:
            parse_authority(authority_text, default_port=80)
            return None  # a port the reference reads: its decision
        except MalformedTarget:
            pass
        # The host ends at the first ':' (after ']' for an IPv6 literal), the port is after the last.
        close = authority_text.find("]") if authority_text.startswith("[") else -1
        colon = authority_text.find(":", close + 1)
        if colon == -1:
            return None
        host = authority_text[:colon]
        port_text = authority_text.rpartition(":")[2]
        if any(char in authority_text[colon:] for char in "@%\\"):
            return None  # userinfo, a zone id, a backslash: refused as the reference does, not a port
        try:
            authority = parse_authority(host, default_port=80)
        except MalformedTarget:
            return None  # the host itself is refused, as the reference does
        port = lenient_port(port_text)
        return Authority(authority.host, port, authority.ip), path
