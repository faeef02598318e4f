"""A weak proxy for the ip-encoding family: its classifier knows dotted-decimal only.

A host that is not a canonical dotted quad is "a name" to it, and names go to the system resolver:
glibc's getaddrinfo reads every inet_aton(3) form first (``0x7f000001``, ``017700000001``,
``2130706433``, ``127.1``, ``0177.0.0.1``, ``0``), so the dial reaches the address those spell,
which nothing classified. Everything the reference refuses for another reason (NUL, whitespace,
``%``, a second trailing dot, ``o177``) is still refused: inet_aton does not take it either.
"""

from __future__ import annotations

import ipaddress
import socket

from broken_proxies.misread import MisreadingProxy, request_text, split_url
from pytest_sandbox.http.streams import Request
from pytest_sandbox.network.addresses import Authority, MalformedTarget, parse_authority


class InetAtonProxy(MisreadingProxy):
    def misread(self, request: Request) -> tuple[Authority, str] | None:
        target = request_text(request)
        split = (target, "") if request.method == "CONNECT" else split_url(target)
        if split is None:
            return None
        authority_text, path = split
        try:
            parse_authority(authority_text, default_port=None if request.method == "CONNECT" else 80)
        except MalformedTarget as error:
            if error.reason != "non_canonical_ipv4":
                return None  # refused for another reason, as the reference does
        else:
            return None  # a canonical literal or a name: the reference judges it
        host, _, port = authority_text.rpartition(":") if ":" in authority_text else (authority_text, "", "80")
        try:
            packed = socket.inet_aton(host)  # the mistake: what getaddrinfo will dial, never classified
        except OSError:
            return None
        address = ipaddress.IPv4Address(packed)
        return Authority(str(address), int(port), address), path
