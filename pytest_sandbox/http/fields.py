"""Header fields: one case-insensitive lookup, and the one hop-by-hop filter every forwarder uses. Pure.

RFC 9110 §5.1: field names are case-insensitive. RFC 9110 §7.6.1: a forwarder removes the hop-by-hop
fields and every field the ``Connection`` header names before it forwards a message. The reference
egress proxy works on bytes (``network/proxy``), the inference interceptor on h11's lowercased bytes
too; both call ``end_to_end`` so the two hops can never drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable

# RFC 9110 §7.6.1 (Connection, Proxy-Connection, Keep-Alive, TE, Transfer-Encoding, Upgrade) and
# RFC 9110 §6.6.2 (Trailer is about this hop's chunked coding).
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)


class HeaderLookup:
    """Mixin: ``header``/``header_values`` over a ``headers`` tuple of (name, value) str pairs.

    Names are compared lower-cased, so h11's lowercase names and a parser's own behave the same.
    """

    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of ``name``, or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)

    def header_values(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]


def connection_options(fields: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Field names the ``Connection`` header lists (OWS-trimmed, lowercased): hop-by-hop for this message."""
    return frozenset(
        token.strip(b" \t").lower()
        for name, value in fields
        if name.lower() == b"connection"
        for token in value.split(b",")
    )


def end_to_end(fields: Iterable[tuple[bytes, bytes]], *, rewritten: frozenset[bytes],
               drop_proxy_fields: bool) -> list[tuple[bytes, bytes]]:
    """``fields`` (names lowercased) minus hop-by-hop ones, every field ``Connection`` names, the fields this
    hop writes itself (``rewritten``) and, with ``drop_proxy_fields``, the ``proxy-*`` family. Order kept."""
    # One loop, no intermediate list: this runs twice per proxied request (bench: benchmarks/bench_proxy.py).
    pairs = fields if isinstance(fields, (tuple, list)) else list(fields)
    listed = connection_options(pairs)
    kept: list[tuple[bytes, bytes]] = []
    for name, value in pairs:
        name = name.lower()
        if name in HOP_BY_HOP or name in rewritten or name in listed or (
                drop_proxy_fields and name.startswith(b"proxy-")):
            continue
        kept.append((name, value))
    return kept

